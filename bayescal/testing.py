"""Known-truth problems shared by the tests and the benchmarks.

Synthetic specimens from a known perzyna-voce population (not the card's prior centres) on an
informative path: two rates, a relaxation hold, an unload and a reload to 16 % strain, so that
Voce hardening saturates (on a path that stops at a few percent, Rinf trades off against d).
The benchmarks import them from here, never from the tests.
"""

from __future__ import annotations

import dataclasses

import torch

from bayescal.card import ModelSpec, load_card
from bayescal.check import piecewise_path
from bayescal.data import Experiments
from bayescal.hierarchy import Hierarchy

#: The card of the recovery problems (relative to the repository's root).
CARD = "models/perzyna-voce.toml"
#: The population's true means; every specimen value is ``mean * (1 + TRUE_CV * N(0, 1))``.
TRUE_MEANS = {"sy": 280.0, "Rinf": 180.0, "d": 18.0, "eta": 250.0}
TRUE_CV = 0.08
#: Measurement noise sd (MPa).
NOISE = 2.0
#: (strain rate, strain at the segment's end) of the informative path.
RECOVERY_SEGMENTS = ((40.0, 0.04), (0.4, 0.08), (60.0, 0.08), (0.2, 0.078), (8.2, 0.16))


def synthetic(n_specimens: int, seed: int, points_per_segment: int = 20):
    """Experiments on RECOVERY_SEGMENTS from the known population, with Gaussian noise of sd
    NOISE; returns (experiments, true specimen values)."""
    spec = load_card(CARD)
    t, e = piecewise_path(RECOVERY_SEGMENTS, points_per_segment)
    time = t[:, None].expand(-1, n_specimens).contiguous()
    strain = e[:, None].expand(-1, n_specimens).contiguous()
    ids = tuple(f"S{i:02d}" for i in range(n_specimens))
    mask = torch.ones_like(time, dtype=torch.bool)
    blank = Experiments(ids, time, strain, torch.zeros_like(time), mask, None, {}, "synthetic")
    generator = torch.Generator().manual_seed(seed)
    truth = {k: m * (1 + TRUE_CV * torch.randn(n_specimens, generator=generator,
                                                         dtype=torch.float64))
             for k, m in TRUE_MEANS.items()}
    clean = Hierarchy(spec, blank).solve_stress(truth, adjoint=False)[0].T
    stress = clean + NOISE * torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    return dataclasses.replace(blank, stress=stress), truth


def long_chunks(spec: ModelSpec) -> ModelSpec:
    """One chunk for the whole path: with few specimens the prefix-scan solve makes long
    chunks cheap (see :class:`bayescal.integrate.SmallBlockScan`)."""
    return dataclasses.replace(spec, solver=dataclasses.replace(spec.solver, n_chunk=400))
