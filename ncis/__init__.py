"""NCIS: Non-linear Class-wise Invariant Sampling of synthetic outliers for OOD detection."""

__version__ = "0.1.0"
