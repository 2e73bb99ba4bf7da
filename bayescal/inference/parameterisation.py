"""Centered or non-centered, per parameter, from the data (the usual rule, at the Laplace point).

A specimen's value ``z_i`` of a varying parameter can be sampled through an offset,
``z_i = z_pop + tau offset_i`` (non-centered), or directly, ``z_i ~ Normal(z_pop, tau)``
(centered). Which geometry suits a sampler depends on how strongly the data pin ``z_i``
compared with the population spread ``tau``: where the likelihood dominates, the
non-centered posterior is a narrow curved valley (the offsets are tied to ``z_pop`` and
``tau``) and the centered one is nearly Gaussian; where the population prior dominates, it
is the other way round (the centered funnel). For a Gaussian likelihood of precision
``lambda`` on ``z_i`` and the prior ``N(z_pop, tau^2)``, the posterior sd of ``z_i`` is
``tau / sqrt(1 + lambda tau^2)``: below ``tau / sqrt(2)`` exactly when the data carry more
information than the population prior. That threshold decides, per parameter, from the
Laplace approximation's sd of each specimen's value averaged over the specimens.
"""

from __future__ import annotations

import math

import torch

from bayescal.inference.packing import Packing

#: Centered when a specimen's posterior sd (in z) is below this fraction of ``tau``.
CENTERED_BELOW = 1 / math.sqrt(2)


def specimen_sd_ratios(packing: Packing, u: torch.Tensor,
                       covariance: torch.Tensor) -> dict[str, float]:
    """For each varying parameter of a non-centered ``packing``: the Laplace posterior sd of
    a specimen's value in z (from ``covariance`` at ``u``, mapped by the Jacobian of what the
    likelihood sees), over the population scale ``tau`` at ``u``, averaged over specimens."""
    h, where = packing.h, packing.slices()
    if h.centered:
        raise ValueError("specimen_sd_ratios needs the non-centered packing")
    jacobian = torch.autograd.functional.jacobian(
        lambda v: packing.likelihood_coordinates(v[None])[0], u)
    sd = (jacobian @ covariance @ jacobian.T).diagonal().clamp_min(0).sqrt()
    n = h.experiments.n_specimens
    first = len(h.spec.shared)
    ratios = {}
    for k, name in enumerate(h.spec.varying):
        pop = u[where[f"{name}_pop_z"]]
        tau = h.specimen_scale(name, pop, u[where[f"{name}_cv"]].exp())
        ratios[name] = float((sd[first + k * n:first + (k + 1) * n] / tau).mean())
    return ratios


def choose_centered(ratios: dict[str, float]) -> frozenset[str]:
    """The parameters to sample centered: those whose data pin the specimens
    (:data:`CENTERED_BELOW`)."""
    return frozenset(name for name, ratio in ratios.items() if ratio < CENTERED_BELOW)


def describe(varying: tuple[str, ...], centered: frozenset[str]) -> str:
    """One line: each varying parameter's parameterisation, e.g. ``sy centered, d non-centered``."""
    return ", ".join(f"{name} {'centered' if name in centered else 'non-centered'}"
                     for name in varying)
