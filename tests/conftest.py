"""Shared fixtures: small generated data sets (never downloaded) and test-wide settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Each xdist worker gets its own core; more threads than cores only thrashes.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
