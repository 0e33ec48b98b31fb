"""Shared set-up for the papermill smoke tests: run from the repo root, offline, single-threaded."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('OMP_NUM_THREADS', '1')
shared = ROOT.parent / 'shared' / 'data'
if 'NS_VIT_DATA' not in os.environ and shared.is_dir():
    os.environ['NS_VIT_DATA'] = str(shared)
