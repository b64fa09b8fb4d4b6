#!/usr/bin/env python3
"""Training curves (loss, lr, test outputs) and CSV tables from a Caffe-format log.

    python3 tools/plot_training.py LOG --out PREFIX

A thin wrapper over `crfgrad plot training` (crfgrad_cupy.cli.plot, crfgrad_cupy.plots)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from crfgrad_cupy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["plot", "training"] + sys.argv[1:]))
