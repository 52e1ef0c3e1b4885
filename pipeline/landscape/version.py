"""The package's version, recorded in every surface file it plans."""

__version__ = "0.1.0"
