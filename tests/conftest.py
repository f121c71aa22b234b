"""Shared fixtures: small generated data sets (never downloaded) and test-wide settings."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# `make test` runs two xdist workers on two cores, and many tests start trainer subprocesses: more threads
# than cores only thrashes (tiny models ran 5-20x slower with two threads per process on a busy machine).
# The environment variable reaches the subprocesses; set_num_threads covers this process.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
