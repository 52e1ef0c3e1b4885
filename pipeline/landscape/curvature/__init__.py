"""Curvature of a model's loss below any experiment: Hessian and Gauss-Newton operators
and the full-data gradient (:mod:`~landscape.curvature.operators`), their extreme
eigenvalues (:mod:`~landscape.curvature.lanczos`), their spectrum (density, top-k,
outliers: :mod:`~landscape.curvature.spectrum`), trace and Frobenius-norm estimators
(:mod:`~landscape.curvature.trace`), the gradient's share of an eigenspace
(:mod:`~landscape.curvature.subspace`) and the clustering of logit gradients
(:mod:`~landscape.curvature.clustering`). They take a model, the names of the parameters to
differentiate, data and an objective (:mod:`landscape.objectives`); nothing here reads a
config or a file.

This file names the choices a config may make, without importing torch, so the config
checks them at load.
"""

PARAMETER_SELECTIONS = ("all", "weights")
HVP_MODES = {"forward_over_reverse": "jvp of grad", "double_backward": "double backward"}
METHODS = ("lanczos", "eigsh", "shift")
