#!/usr/bin/env python3
"""MatConvNet model (.mat, SimpleNN or DagNN, MAT v5/v7/v7.3) -> Caffe PREFIX.prototxt + PREFIX.caffemodel.

    python3 converters/matconvnet_to_caffe.py IN.mat OUT_PREFIX [--input-shape N,C,H,W] [--variable NAME]

A thin wrapper over `crfgrad convert matconvnet` (crfgrad_cupy.cli.convert)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from crfgrad_cupy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", "matconvnet"] + sys.argv[1:]))
