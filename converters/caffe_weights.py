#!/usr/bin/env python3
"""Caffe weights between .caffemodel, .caffemodel.h5, .npz and MATLAB .mat.

    python3 converters/caffe_weights.py IN OUT [--proto P] [--axis-order matcaffe|matconvnet] [--mat-version 5|7|7.3]

A thin wrapper over `crfgrad convert weights` (crfgrad_cupy.cli.convert)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from crfgrad_cupy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", "weights"] + sys.argv[1:]))
