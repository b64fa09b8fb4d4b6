#!/usr/bin/env python3
"""Learned spatial filters of a CrfGrad layer as a class-pair grid (paper Fig. 1/4).

    python3 tools/plot_filters.py WEIGHTS [--proto P] [--layer L] [--class-names a,b] [--pairs 0-1] --out F.png

A thin wrapper over `crfgrad plot filters` (crfgrad_cupy.cli.plot, crfgrad_cupy.plots)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from crfgrad_cupy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["plot", "filters"] + sys.argv[1:]))
