"""Shared test setup: the project root on sys.path, small thread count, paths to ../shared/testdata."""
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TESTDATA = ROOT.parent / "shared" / "testdata"
torch.set_num_threads(min(2, os.cpu_count() or 1))
