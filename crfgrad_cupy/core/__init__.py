"""The math of CRF-Grad as pure functions over an array module (NumPy or CuPy).

Nothing here knows about Caffe, blobs or layers."""
