"""Posterior draws from a fitted guide, pushed through the model in batched solves.

Draws and specimens share one batch (split into pieces of at most ``max_batch`` specimen
solves to bound memory), never one solve per draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoDelta

from bayescal.hierarchy import Hierarchy, Solving
from bayescal.integrate import MAX_BATCH
from bayescal.inference.packing import Packing, latent_names


@dataclass
class Draws:
    """Posterior draws in physical units, leading dimension = draw."""

    parameters: dict[str, torch.Tensor]  # (draw, specimen) when varying, (draw,) when shared
    population: dict[str, torch.Tensor]  # P_pop_mean, P_pop_sd: (draw,)
    noise_sd: torch.Tensor  # (draw,)
    stress_mean: torch.Tensor  # (draw, specimen, step), noise-free
    failed_draws: int = 0
    same_point: bool = False  # every draw is one point (a MAP fit's): one solve, one likelihood

    def take(self, index) -> Draws:
        """The draws at ``index`` (e.g. an importance resampling's, repeats allowed)."""
        index = torch.as_tensor(index)
        failed = torch.isnan(self.stress_mean[index]).flatten(1).any(-1)
        return Draws(parameters={k: v[index] for k, v in self.parameters.items()},
                     population={k: v[index] for k, v in self.population.items()},
                     noise_sd=self.noise_sd[index], stress_mean=self.stress_mean[index],
                     failed_draws=int(failed.sum()), same_point=self.same_point)


def sample_guide(h: Hierarchy, guide, n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` latent draws from a guide (a MAP guide gives ``n`` copies of its point)."""
    names = latent_names(h)
    if isinstance(guide, AutoDelta):
        point = guide.median()
        return {k: point[k].detach().expand(n, *point[k].shape).clone() for k in names}
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        samples = Predictive(guide, num_samples=n, parallel=True, return_sites=names)()
    return {k: v.reshape(n, -1).squeeze(-1) if k in _globals(h) else v.reshape(n, -1)
            for k, v in samples.items()}


def unpack_draws(h: Hierarchy, packing, u: torch.Tensor) -> dict[str, torch.Tensor]:
    """Latent draws from rows of the packed unconstrained vector ``u`` (draw, dim) of a
    :class:`~bayescal.inference.packing.Packing` (e.g. MCMC draws), shaped as
    :func:`sample_guide`'s."""
    values, _ = packing.constrain(u)
    return {k: v.squeeze(-1) if k in _globals(h) else v for k, v in values.items()}


def _globals(h: Hierarchy) -> set[str]:
    return {f"{n}_z" for n in h.spec.shared} | {
        f"{n}_{s}" for n in h.spec.varying for s in ("pop_z", "cv")} | {"noise_sd"}


def posterior_draws(h: Hierarchy, latents: dict[str, torch.Tensor],
                    max_batch: int = MAX_BATCH, unique: bool = False) -> Draws:
    """Physical parameters, population moments and noise-free stress for latent draws.

    ``unique`` says that every draw is the same point (MAP): it is solved once. Otherwise
    Newton starts every draw's solve from the trajectory at the draws' median
    (:func:`_centre_trajectory`, one solve more), moved to each draw's state chunk by chunk
    (:class:`~bayescal.integrate.ShiftedTrajectoryPredictor`): draws lie a posterior's
    width apart, and from there the solves took less time than from the step predictor
    (one-off script, both in one process, twice: 96 Laplace draws of the 304L set 12.9-13.5 s
    against 16.3-17.0 s, 128 of 64 synthetic specimens 4.4-4.6 s against 5.5-5.7 s, the
    stress the same to 8e-8 MPa). Before the start was moved, and had its stage values
    interpolated, it was the slower one (benchmarks/README.md, realdata).
    """
    n = latents["noise_sd"].shape[0]
    solve_n = 1 if unique else n
    per_piece = max(1, max_batch // h.experiments.n_specimens)
    centre = None if unique else _centre_trajectory(h, latents)
    params, stresses, failed = [], [], 0
    for start in range(0, solve_n, per_piece):
        piece = {k: v[start:min(start + per_piece, solve_n)] for k, v in latents.items()}
        size = piece["noise_sd"].shape[0]
        values, stress = h.responses(piece, Solving(
            strict=False, warm_start=centre is not None,
            previous=None if centre is None else centre.repeat(1, size, 1)))
        params.append(values)
        stresses.append(stress)
        failed += int(torch.isnan(stress).flatten(1).any(-1).sum())
    parameters = {k: torch.cat([p[k] for p in params]) for k in params[0]}
    stress_mean = torch.cat(stresses)
    if unique:
        parameters = {k: v.expand(n, *v.shape[1:]) for k, v in parameters.items()}
        stress_mean = stress_mean.expand(n, *stress_mean.shape[1:])
        failed *= n
    return Draws(parameters=parameters, population=h.population(latents),
                 noise_sd=latents["noise_sd"], stress_mean=stress_mean, failed_draws=failed,
                 same_point=unique)


def _centre_trajectory(h: Hierarchy, latents: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The trajectory (this rank's specimens) at the draws' elementwise median, where
    Newton starts every draw's solve; None if its solve failed."""
    middle = {k: v.median(dim=0).values[None] for k, v in latents.items()}
    solving = Solving(strict=False, warm_start=True)
    h.responses(middle, solving)
    return None if solving.reports[-1].n_failed else solving.previous


def predictive_and_loglik(h: Hierarchy, draws: Draws, seed: int):
    """Posterior-predictive stress (with noise) and each specimen's log likelihood per draw.

    The predictive (draw, specimen, point) is made in place, in one array: it is the
    largest of a fit (1000 MAP draws of 64 specimens of 600 points: 300 MB), which every
    rank makes, and three temporaries of that size took 0.35 s on one process and 1.1 s
    on each of 2 (64 synthetic specimens; benchmarks/README.md, scale)."""
    exp = h.experiments
    generator = torch.Generator().manual_seed(seed)
    predictive = torch.randn(draws.stress_mean.shape, generator=generator, dtype=torch.float64)
    predictive.mul_(draws.noise_sd[:, None, None]).add_(draws.stress_mean)
    predictive.masked_fill_(~exp.mask.T, torch.nan)
    return predictive, log_likelihood(h, draws)


def log_likelihood(h: Hierarchy, draws: Draws) -> torch.Tensor:
    """Each specimen's log likelihood of the data per draw, ``(draw, specimen)``: the
    model's observed term (:meth:`Hierarchy.__call__`) from the draws' solved stress (NaN
    where a draw's solve failed). Draws of one point are evaluated once."""
    exp = h.experiments
    n = 1 if draws.same_point else len(draws.noise_sd)
    logp = torch.distributions.Normal(draws.stress_mean[:n], draws.noise_sd[:n, None, None]
                                      ).log_prob(torch.nan_to_num(exp.stress.T))
    return torch.where(exp.mask.T, logp, 0.0).sum(-1).expand(len(draws.noise_sd), -1).clone()
