#!/usr/bin/env python3
"""Caffe net (+ weights) -> MatConvNet DagNN .mat (variable `net`).

    python3 converters/caffe_to_dagnn.py deploy.prototxt OUT.mat [--weights W.caffemodel] [--mat-version 7.3]

A thin wrapper over `crfgrad convert to-dagnn` (crfgrad_cupy.cli.convert)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from crfgrad_cupy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", "to-dagnn"] + sys.argv[1:]))
