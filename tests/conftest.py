"""Puts the repository root on sys.path so that tests can `import maipg_mpe` and the other scripts."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
