"""Loss landscapes and Hessian curvature of neural networks, planned into one HDF5 file.

From Python, use :mod:`landscape.api` (``from landscape import api``): ``load_config``,
``plan``, ``run``, ``trace``, ``reduce``, ``status``, ``plot``, ``read`` and ``train``,
each what the command of the same name does. (They live in their own module because
most of those names are also the package's modules: ``landscape.plan`` is the planner.)
"""

from landscape.version import __version__

__all__ = ["__version__"]
