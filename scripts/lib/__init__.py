"""What the commands in scripts/ share: flags, runs, checkpoints, data, sampling, ONNX helpers."""
