"""Pure numerics of voxel-wise linear mixed models: numpy/scipy only, no MPI, no files.

Modules: ``model`` (data structures), ``products`` (product forms from data), ``structures``
(one module per random-effects structure behind one interface, chosen once per design and
stored as ``pf.algebra``), ``likelihood`` (GLS and the ML/REML log-likelihood), ``theta``
(lme4's Cholesky parameterisation), the estimator and the inference layer.  Every array has
the voxel axis first.
"""
