"""mpiblmm: MPI-parallel voxel-wise linear mixed models for neuroimaging.

The package is layered: ``mpiblmm.lmm`` holds pure numerics (numpy/scipy only, no MPI,
no files); ``mpiblmm.io`` knows HDF5 and NIfTI but no statistics; ``mpiblmm.parallel`` owns
the MPI helpers; only ``mpiblmm.pipeline`` joins them.
"""

__version__ = "0.1.0"
