"""bayescal: hierarchical Bayesian calibration of material models against test histories."""

import warnings

# ArviZ 0.x announces its coming refactor on every import; it is not actionable for users.
warnings.filterwarnings("ignore", message="\\s*ArviZ is undergoing a major refactor",
                        category=FutureWarning)

__version__ = "0.1.0"
