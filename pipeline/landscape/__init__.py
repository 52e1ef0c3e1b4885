"""Loss landscapes and Hessian curvature of neural networks, planned into one HDF5 file."""

__version__ = "0.1.0"
