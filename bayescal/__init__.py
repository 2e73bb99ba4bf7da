"""bayescal: hierarchical Bayesian calibration of material models against test histories."""

__version__ = "0.1.0"
