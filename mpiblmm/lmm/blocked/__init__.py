"""Several random factors at cohort scale: the blocked Cholesky path, vectorised over voxels.

- :mod:`.pattern`: the symbolic factorisation, once per design (fill, dense tail, plans);
- :mod:`.cholesky`: log|V| and the V^-1 product forms at ``theta`` for a chunk of voxels;
- :mod:`.gradient`: the analytic gradient of the profiled deviance (selected inversion);
- :mod:`.newton`: the profiled (RE)ML optimisers in lme4's ``theta``;
- :mod:`.inference`: Satterthwaite quantities (deviance Hessian, Jacobian of Cov(beta)).
"""
