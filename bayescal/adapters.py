"""The one place where bayescal reaches into other packages' non-public attributes.

Each use is a function here, tested in ``tests/test_adapters.py`` against the installed
versions, so that a release that moves one fails those tests loudly instead of bayescal
going wrong silently. Everything else in bayescal uses public APIs only.

* Pyro autoguides build their parameters lazily, on the first call, which also draws a
  sample; :func:`set_up_guide` builds them without drawing, so that a fit's random stream
  is the guide's first step's.
* Pyro's NUTS keeps per-transition statistics only as running values on the kernel:
  :func:`nuts_transition` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro import poutine


def set_up_guide(guide) -> None:
    """Build a Pyro autoguide's parameters (its prototype trace runs the model once) without
    drawing from it."""
    with poutine.block(), torch.no_grad():
        guide._setup_prototype()


@dataclass(frozen=True)
class Transition:
    """What Pyro's NUTS kernel holds after a transition: the number of divergent transitions
    so far, the running mean acceptance probability over the sampling phase, and the
    potential energy of the current point."""

    divergences: int
    mean_accept_prob: float
    potential_energy: float


def nuts_transition(kernel) -> Transition:
    """The statistics of Pyro's NUTS ``kernel`` after its latest transition."""
    return Transition(divergences=len(kernel._divergences),
                      mean_accept_prob=float(kernel._mean_accept_prob),
                      potential_energy=float(kernel._potential_energy_last))
