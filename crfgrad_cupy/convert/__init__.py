"""Converters between Caffe, MATLAB (matcaffe) and MatConvNet formats.

* :mod:`.matfile`    -- read/write MATLAB .mat files (v5/v7 via SciPy, v7.3 via h5py)
* :mod:`.weights`    -- Caffe weights between .caffemodel, Caffe HDF5 and .npz
* :mod:`.matlab`     -- Caffe weights -> MATLAB .mat (matcaffe or MatConvNet axis order)
* :mod:`.matconvnet` -- MatConvNet SimpleNN/DagNN models -> Caffe prototxt + caffemodel
* :mod:`.to_dagnn`   -- Caffe nets -> MatConvNet DagNN .mat
"""
