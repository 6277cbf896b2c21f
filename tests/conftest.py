"""Puts the repository root on sys.path so that tests can `import maipg_mpe` and the other scripts, and gives the
in-process torch one thread, as the scripts' default: on 2 shared cores torch's one-per-core default was up to 12x
slower here whenever a test's subprocess or another job ran beside it."""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)
