"""Curvature of a model's loss below any experiment: Hessian operators
(:mod:`~landscape.curvature.operators`), their extreme eigenvalues
(:mod:`~landscape.curvature.lanczos`), trace and Frobenius-norm estimators
(:mod:`~landscape.curvature.trace`) and the clustering of logit gradients
(:mod:`~landscape.curvature.clustering`). They take a model, the names of the parameters to
differentiate, data and an objective (:mod:`landscape.objectives`); nothing here reads a
config or a file.

This file names the choices a config may make, without importing torch, so the config
checks them at load.
"""

PARAMETER_SELECTIONS = ("all", "weights")
HVP_MODES = {"forward_over_reverse": "jvp of grad", "double_backward": "double backward"}
METHODS = ("lanczos", "eigsh", "shift")
