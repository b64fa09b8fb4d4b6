#!/usr/bin/env python3
"""Intermediate CRF states for one image: image, z, q^1..q^{T-1}, output, ground truth (Fig. 5/11).

    python3 tools/plot_states.py MODEL WEIGHTS IMAGE_OR_NPZ [--mask M] [--class 1] --out F.png

A thin wrapper over `crfgrad plot states` (crfgrad_cupy.cli.plot, crfgrad_cupy.plots)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from crfgrad_cupy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["plot", "states"] + sys.argv[1:]))
