"""Pure numerics of voxel-wise linear mixed models: numpy/scipy only, no MPI, no files.

Modules: ``model`` (data structures), ``products`` (product forms from data), ``likelihood``
(V^-1 products and ML/REML log-likelihood), ``theta`` (lme4's Cholesky parameterisation),
the estimator and the inference layer.  Every array has the voxel axis first.
"""
