"""Command-line programs and the few helpers they share (data, checkpoints, run logging, config)."""
