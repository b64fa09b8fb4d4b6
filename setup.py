from setuptools import find_packages, setup

setup(
    name='crfgrad_cupy',
    version='0.1.0',
    description='Caffe-compatible CRF-Grad (learnable pairwise CRF potentials) on NumPy and CuPy',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['crfgrad_cupy', 'crfgrad_cupy.*']),
    package_data={'crfgrad_cupy': ['proto/caffe.proto', 'models/*/*', 'models/*/*/*']},
    include_package_data=True,
    python_requires='>=3.9',
    install_requires=['numpy>=1.22', 'scipy>=1.8', 'protobuf>=3.20', 'h5py>=3.0',
                      'matplotlib>=3.5', 'tqdm>=4.0', 'pillow>=9.0'],
    extras_require={
        'gpu': ['cupy-cuda12x'],
        'fast': ['numba>=0.59'],
        'test': ['pytest>=7', 'PyMaxflow>=1.3', 'numba>=0.59'],
    },
    entry_points={'console_scripts': ['crfgrad=crfgrad_cupy.cli:main']},
)
