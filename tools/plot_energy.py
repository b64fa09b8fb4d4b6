#!/usr/bin/env python3
"""CRF energy per iteration for a set of images, normalised, with the mean (Fig. 6/9).

    python3 tools/plot_energy.py MODEL WEIGHTS INPUTS... [--leak-factor 0] --out F.png [--csv E.csv]

A thin wrapper over `crfgrad plot energy` (crfgrad_cupy.cli.plot, crfgrad_cupy.plots)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from crfgrad_cupy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["plot", "energy"] + sys.argv[1:]))
