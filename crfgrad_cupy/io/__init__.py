"""File formats: prototxt (+ V0/V1 upgrade), binary caffemodel, Caffe HDF5 weights, solver files."""
