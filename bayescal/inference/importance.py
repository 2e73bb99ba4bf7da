"""Does an approximate posterior hold? Importance ratios, Pareto k-hat, and resampling.

An approximate posterior ``q`` (Laplace, or an SVI guide) is checked on its own draws
(Yao, Vehtari, Simpson & Gelman 2018, "Yes, but did it work?"): the log importance ratios
``log p(theta, y) - log q(theta)`` of the stored draws, their Pareto-smoothed version
(PSIS, ArviZ's :func:`arviz.psislw`) and the shape ``k`` of the generalised Pareto
distribution fitted to their upper tail. ``k`` says how heavy the tail of ``p / q`` is: below
0.5 ``q`` covers ``p`` and its draws can be used as they are; between 0.5 and 0.7 the
importance-weighted draws still give reliable estimates; above 0.7 the ratios have
(nearly) infinite variance, ``q`` misses mass that ``p`` has, and neither the draws nor their
weights can be trusted (Vehtari et al. 2024, "Pareto smoothed importance sampling").

Both densities are taken in the model's packed unconstrained coordinates
(:class:`~bayescal.inference.packing.Packing`), where the guides live: the Jacobian of the
constraining transforms enters ``p`` and ``q`` alike, so the ratio is the same as in the
constrained space. ``log p`` is :meth:`Packing.log_joint` on all draws in batched solves;
a draw whose solve fails gets ``log p = -inf`` (weight zero), never a silent zero.

SVI minimises KL(q || p) and so under-disperses: a Gaussian that cannot hold the strong
specimen-level correlations shrinks the marginals. Resampling ``q``'s draws with the
smoothed weights (:func:`resample`) corrects moderate misfits (k < 0.7); it cannot invent
mass that ``q`` never proposed, which is why larger ``k`` asks for a better approximation.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro.infer.autoguide import AutoContinuous, AutoNormal

from bayescal.arviz_import import az
from bayescal.hierarchy import Solving
from bayescal.integrate import MAX_BATCH

#: Below this k-hat the approximation can be used as it is (Vehtari et al. 2024).
K_RELIABLE = 0.5
#: Below this k-hat importance-corrected estimates are reliable; above it they are not.
K_USABLE = 0.7


@dataclass
class ImportanceCheck:
    """The check of an approximation on its draws (each array has one entry per draw)."""

    log_ratio: np.ndarray  # log p(theta, y) - log q(theta); -inf where the solve failed
    log_weight: np.ndarray  # Pareto-smoothed, normalised (logsumexp = 0)
    pareto_k: float
    failed: int  # draws whose solve failed (weight zero)

    @property
    def ess(self) -> float:
        """Effective sample size of the smoothed weights, ``1 / sum w^2``."""
        return float(1.0 / np.exp(2 * self.log_weight).sum())


def guide_log_density(guide, packing, u: torch.Tensor) -> torch.Tensor:
    """``log q(u)`` of a Gaussian guide at rows of the packed unconstrained vector ``u``.

    Full-rank and low-rank guides (:class:`AutoContinuous`) are distributions over this
    vector; the mean-field ``AutoNormal`` is one independent normal per site.
    """
    with torch.no_grad():
        if isinstance(guide, AutoContinuous):
            return guide.get_posterior().log_prob(u)
        if isinstance(guide, AutoNormal):
            total = torch.zeros(u.shape[0], dtype=u.dtype)
            for name, where in packing.slices().items():
                loc = getattr(guide.locs, name).reshape(-1)
                scale = getattr(guide.scales, name).reshape(-1)
                total = total + torch.distributions.Normal(loc, scale).log_prob(
                    u[:, where]).sum(-1)
            return total
    raise TypeError(f"no density for a guide of type {type(guide).__name__}")


def log_joint(packing, u: torch.Tensor, max_batch: int = MAX_BATCH) -> torch.Tensor:
    """``log p(u, y)`` (unconstrained, Jacobian included) for each row of ``u``, in batched
    solves of at most ``max_batch`` specimen solves; ``-inf`` where a solve failed."""
    per_piece = max(1, max_batch // packing.h.experiments.n_specimens)
    with torch.no_grad(), pyro.validation_enabled(False):
        pieces = [packing.log_joint(u[i:i + per_piece], Solving(strict=False))
                  for i in range(0, u.shape[0], per_piece)]
    return torch.nan_to_num(torch.cat(pieces), nan=-torch.inf)


def pareto_smooth(log_ratio: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed normalised log weights and k-hat (ArviZ's PSIS) of log ratios of
    independent draws (``reff = 1``). Draws with ``-inf`` (failed solves) keep weight zero.
    Equal ratios (``q`` proportional to ``p``: the approximation is exact) have no tail to
    fit; they get equal weights and k-hat ``-inf``."""
    log_ratio = np.asarray(log_ratio, dtype=float)
    finite = np.isfinite(log_ratio)
    if finite.sum() < 2:
        return np.full_like(log_ratio, -np.inf), float("inf")
    log_weight = np.full_like(log_ratio, -np.inf)
    if np.ptp(log_ratio[finite]) <= 1e-9 * max(1.0, np.abs(log_ratio[finite]).max()):
        log_weight[finite] = -np.log(finite.sum())
        return log_weight, -float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns on k > 0.7, which we report ourselves
        smoothed, k = az.psislw(log_ratio[finite] - log_ratio[finite].max(), reff=1.0)
    log_weight[finite] = smoothed
    return log_weight, float(k)


def check_approximation(packing, guide, latents: dict[str, torch.Tensor],
                        max_batch: int = MAX_BATCH, log_likelihood: torch.Tensor | None = None
                        ) -> ImportanceCheck:
    """Log ratios, smoothed weights and k-hat of ``guide``'s draws ``latents`` (shaped as
    :func:`~bayescal.inference.draws.sample_guide` gives them) on ``packing``'s model.

    ``log_likelihood`` (draw,), the data's log likelihood at each draw where the caller has
    solved the draws already (NaN where a solve failed), spares solving them again: the
    log joint is then :meth:`Packing.log_prior` (no solve) plus it."""
    u = packing.pack(latents)
    if log_likelihood is None:
        log_p = log_joint(packing, u, max_batch)
    else:
        with torch.no_grad():
            log_p = torch.nan_to_num(packing.log_prior(u) + log_likelihood, nan=-torch.inf)
    log_ratio = (log_p - guide_log_density(guide, packing, u)).numpy()
    log_weight, k = pareto_smooth(log_ratio)
    return ImportanceCheck(log_ratio=log_ratio, log_weight=log_weight, pareto_k=k,
                           failed=int((~np.isfinite(log_ratio)).sum()))


def resample(log_weight: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` draws chosen with probabilities ``exp(log_weight)`` by systematic
    resampling: one uniform offset ``U`` (seeded), then the draw whose cumulative weight
    first exceeds ``(U + j) / n`` for ``j = 0..n-1``. Each draw is kept ``floor(n w)`` or
    ``ceil(n w)`` times, less variance than independent (multinomial) choices."""
    weight = np.exp(np.asarray(log_weight, dtype=float) - np.max(log_weight))
    cumulative = np.cumsum(weight / weight.sum())
    cumulative[-1] = 1.0
    offset = np.random.default_rng(seed).uniform()
    return np.searchsorted(cumulative, (offset + np.arange(n)) / n, side="right")


def verdict(k: float, guide: str = "") -> str:
    """What a k-hat means for the user, in plain words, with what to do about it (the
    full-rank guide is suggested only to a fit that did not use it)."""
    if not np.isfinite(k):
        return ("no usable draws (the solver failed on almost all of them): the approximation "
                "cannot be checked; refit with --method nuts")
    if k < K_RELIABLE:
        return "reliable: the approximation covers the posterior"
    if k < K_USABLE:
        return ("usable with importance correction: the draws are resampled with the "
                "Pareto-smoothed weights (unless --no-importance)")
    better = "--method nuts" if guide == "mvn" else \
        "the full-rank guide (--guide mvn) or, better, --method nuts"
    return ("unreliable: the approximation does not match the posterior (its intervals may be "
            f"too narrow, most often for the population spreads); refit with {better}")


def centered_caution(method: str, centered: Iterable[str]) -> str:
    """The caution for a Gaussian approximation (laplace, svi) of centered specimen values.

    There the joint mode pulls the specimens toward their population (the funnel's neck), so
    the specimen intervals come out too narrow, and k-hat does not show it: the Gaussian
    fits the posterior well near that mode, where its draws are (benchmarks/heldout.py).
    """
    return (f"{method} with centered specimen values ({', '.join(sorted(centered))}): a "
            "Gaussian at the centered mode pulls the specimens toward their population, so "
            "their intervals are too narrow, and k-hat does not show it; drop --centered "
            "(laplace and svi work non-centered by default) or use --method nuts")


def correct(check: ImportanceCheck, seed: int, enabled: bool = True
            ) -> tuple[np.ndarray, dict, dict]:
    """Which of the checked draws to store (indices into them), run attributes and
    ``sample_stats`` of a checked approximation.

    With ``enabled`` and ``k < K_USABLE`` the draws are resampled (:func:`resample`, as many
    as there were) with the smoothed weights, so that the stored posterior is the
    importance-corrected one; above it the weights are no better than the draws, and the
    draws are kept as they are (the verdict says what to run instead). ``sample_stats``
    holds, per stored draw, the log ratio and smoothed log weight of the guide's draw it is
    (or copies), shaped (chain = 1, draw).
    """
    n = check.log_ratio.shape[0]
    resampled = bool(enabled and check.pareto_k < K_USABLE)
    index = resample(check.log_weight, n, seed) if resampled else np.arange(n)
    attrs = {"pareto_k": check.pareto_k, "importance_resampled": resampled,
             "importance_ess": check.ess, "importance_failed_draws": check.failed}
    stats = {"log_ratio": check.log_ratio[index][None],
             "log_weight": check.log_weight[index][None]}
    return index, attrs, stats
