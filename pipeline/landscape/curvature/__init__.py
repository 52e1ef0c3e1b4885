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
# ``auto`` (the configs' default) takes the mode measured faster on the device's type, a
# rule rather than a timing at run time, so every rank and resume differentiates alike:
# on CPUs double backward (2 cores, batch 128, float32: a digits MLP 5.0x, the BatchNorm
# CNN 2.0x, ResNet-20 1.5x faster, benchmarks/warm_bench.py), on CUDA forward over reverse
# (one H200, ResNet-56 on 5,000 images: 1.37 s against 9.50 s a product, 2.3x a
# gradient against 15.6x, benchmarks/cuda_bench.py).
AUTOMATIC_HVP_MODE = {"cpu": "double_backward", "cuda": "forward_over_reverse"}
HVP_CHOICES = ("auto", *HVP_MODES)
METHODS = ("lanczos", "eigsh", "shift")
