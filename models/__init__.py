"""Networks and the diffusion core: pure PyTorch, nothing about data, files or training loops."""
