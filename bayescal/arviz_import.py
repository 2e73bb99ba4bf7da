"""ArviZ, imported once for bayescal without its import-time notice.

ArviZ 0.x announces its coming refactor (a FutureWarning) when it is first imported; it is
not actionable for bayescal's users. The notice is silenced for that import only, here,
rather than by a process-wide warning filter.
"""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="\\s*ArviZ is undergoing a major refactor",
                            category=FutureWarning)
    import arviz as az

__all__ = ["az"]
