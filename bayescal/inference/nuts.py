"""NUTS through the chunked adjoint, started from the Laplace (or SVI) approximation.

The sampler runs Pyro's NUTS on the model's packed unconstrained vector ``u``
(:class:`~bayescal.inference.packing.Packing`), whitened by the approximation the fit starts
from: ``u = centre + L w`` with ``L L^T`` the Laplace covariance (``init="map"``) or the
full-rank SVI guide's (``init="svi"``). That is a dense mass matrix fixed before warm-up;
warm-up then adapts the step size and a diagonal (or, with ``dense``, a full) correction in
``w``. Chains start at draws from the approximation and run in parallel processes.

A solve that fails to converge raises :class:`~bayescal.hierarchy.SolverFailure`, which the
potential hands to Pyro as a NaN energy: the trajectory is divergent and the point gets
zero weight (a rejection), never a zero gradient. Such events are counted per draw.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import pyro
import torch
from pyro.infer.mcmc import MCMC, NUTS
from pyro.ops.integrator import register_exception_handler

from bayescal.adapters import nuts_transition
from bayescal.card import ModelSpec
from bayescal.data import Experiments
from bayescal.errors import InvalidSetting
from bayescal.hierarchy import Hierarchy, SolverFailure, Solving
from bayescal.inference.accuracy import replan_at_map
from bayescal.inference.laplace import MAPConfig
from bayescal.inference.packing import Packing, initial_values, to_centered
from bayescal.inference.svi import SVIConfig, run_svi
from bayescal.integrate import SolverOptions

INITS = ("map", "svi")

register_exception_handler("bayescal_solver_failure", lambda e: isinstance(e, SolverFailure),
                           warn_on_overwrite=False)


@dataclass(frozen=True)
class NUTSConfig:
    """Settings of a NUTS run. ``processes`` defaults to one per chain, at most one per core."""

    chains: int = 4
    warmup: int = 300
    samples: int = 500
    max_tree_depth: int = 8
    target_accept: float = 0.8
    init: str = "map"
    dense: bool = False
    processes: int | None = None

    def __post_init__(self) -> None:
        for name in ("chains", "samples", "max_tree_depth"):
            if getattr(self, name) < 1:
                raise InvalidSetting(name, f"must be at least 1, got {getattr(self, name)}",
                                     "NUTS")
        if self.warmup < 0:
            raise InvalidSetting("warmup", f"must be 0 or more, got {self.warmup}", "NUTS")
        if not 0 < self.target_accept < 1:
            raise InvalidSetting("target_accept", "must lie between 0 and 1, got "
                                 f"{self.target_accept}", "NUTS")
        if self.init not in INITS:
            raise InvalidSetting("init", f"{self.init!r} is unknown; choose one of "
                                 f"{', '.join(INITS)}", "NUTS")
        if self.processes is not None and self.processes < 1:
            raise InvalidSetting("processes", f"must be at least 1, got {self.processes}",
                                 "NUTS")


#: Per-draw statistics, in ArviZ's names. ``n_steps`` counts the draw's gradient
#: evaluations; ``tree_depth`` is the number of doublings that many steps take.
STAT_NAMES = ("diverging", "n_steps", "tree_depth", "step_size", "acceptance_rate", "lp",
              "solver_failures")


@dataclass
class NUTSResult:
    """Draws of the packed unconstrained vector ``(chain, draw, dim)``, per-draw statistics
    ``(chain, draw)`` (:data:`STAT_NAMES`) and the run's counts and times."""

    u: torch.Tensor
    stats: dict[str, np.ndarray]
    warmup_solver_failures: int
    solver_retries: int
    init_time: float
    sampling_time: float
    init_steps: int
    substeps: torch.Tensor  # the integration grid the chains ran on (per recorded interval)


@dataclass(frozen=True)
class _Chain:
    """What one chain's process needs (picklable)."""

    spec: ModelSpec
    experiments: Experiments
    options: SolverOptions
    substeps: torch.Tensor
    centered: bool
    centre: torch.Tensor
    root: torch.Tensor
    config: NUTSConfig
    seed: int
    index: int
    threads: int


class _Potential:
    """``w -> -log p(centre + root w)``, counting evaluations and solver failures."""

    def __init__(self, packing: Packing, centre: torch.Tensor, root: torch.Tensor) -> None:
        self.packing, self.centre, self.root = packing, centre, root
        self.evaluations = 0
        self.failures = 0
        self.retries = 0

    def __call__(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        self.evaluations += 1
        u = self.centre + self.root @ params["w"]
        solving = Solving()
        try:
            return -self.packing.log_joint(u[None], solving)[0]
        except SolverFailure:
            self.failures += 1
            raise
        finally:
            self.retries += solving.retries


def _chain_seed(seed: int, chain: int) -> int:
    return int(np.random.SeedSequence([seed, chain]).generate_state(1)[0])


def _start(potential: _Potential, dim: int, seed: int) -> torch.Tensor:
    """A chain's start: a draw from the approximation where the model solves (else its centre)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(10):
        w = torch.randn(dim, generator=generator, dtype=torch.float64)
        try:
            with torch.no_grad():
                if torch.isfinite(potential({"w": w})):
                    return w
        except SolverFailure:
            pass
    return torch.zeros(dim, dtype=torch.float64)


def run_chain(job: _Chain, report=None) -> dict:
    """One chain; ``report(chain, stage)`` is called after each draw. Returns its draws of
    ``u`` and per-draw statistics (sampling phase), and warm-up counts. Runs in the calling
    process as it is set up (float64 is bayescal's precision: see :func:`_run_chain_reporting`
    for a worker process)."""
    h = Hierarchy(job.spec, job.experiments, job.options, centered=job.centered,
                  substeps=job.substeps)
    packing = Packing(h, initial_values(h))
    potential = _Potential(packing, job.centre, job.root)
    seed = _chain_seed(job.seed, job.index)
    pyro.set_rng_seed(seed)
    w0 = _start(potential, packing.dim, seed)
    config = job.config
    kernel = NUTS(potential_fn=potential, step_size=0.5, adapt_step_size=True,
                  adapt_mass_matrix=True, full_mass=config.dense,
                  target_accept_prob=config.target_accept, max_tree_depth=config.max_tree_depth)
    stats = {name: [] for name in STAT_NAMES}
    marks = {"evaluations": potential.evaluations, "failures": potential.failures,
             "divergences": 0, "accept": 0.0}
    warmup_failures = 0

    def hook(kernel, params, stage, i):
        nonlocal warmup_failures
        steps = potential.evaluations - marks["evaluations"]
        failures = potential.failures - marks["failures"]
        marks["evaluations"], marks["failures"] = potential.evaluations, potential.failures
        if stage.startswith("Warmup"):
            warmup_failures += failures
        else:
            n = i + 1
            transition = nuts_transition(kernel)
            diverged = transition.divergences > marks["divergences"]
            marks["divergences"] = transition.divergences
            # Pyro keeps only the running mean over sampling draws: this draw's value is
            # recovered from two successive means (clipped for rounding)
            mean = transition.mean_accept_prob
            accept = marks["accept"] + n * (mean - marks["accept"])
            stats["acceptance_rate"].append(min(max(accept, 0.0), 1.0))
            marks["accept"] = mean
            stats["diverging"].append(diverged)
            stats["n_steps"].append(steps)
            stats["tree_depth"].append(math.ceil(math.log2(steps + 1)) if steps else 0)
            stats["step_size"].append(kernel.step_size)
            stats["lp"].append(-transition.potential_energy)
            stats["solver_failures"].append(failures)
        if report is not None:
            report(job.index, stage)

    mcmc = MCMC(kernel, num_samples=config.samples, warmup_steps=config.warmup,
                initial_params={"w": w0}, hook_fn=hook, disable_progbar=True)
    mcmc.run()
    w = mcmc.get_samples()["w"].reshape(config.samples, -1)
    return {"u": (job.centre + w @ job.root.T).detach(), "stats": stats,
            "warmup_failures": warmup_failures, "retries": potential.retries}


def _run_chain_reporting(job: _Chain, queue) -> dict:
    """:func:`run_chain` in a worker process of its own (float64, the parent's thread count),
    reporting progress through ``queue``."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(job.threads)
    return run_chain(job, lambda chain, stage: queue.put((chain, stage)))


def _run_chains(jobs: list[_Chain], processes: int, progress: bool) -> list[dict]:
    """Run the chains, ``processes`` at a time (spawned processes when more than one), with
    a progress bar per chain."""
    from tqdm.auto import tqdm

    total = jobs[0].config.warmup + jobs[0].config.samples
    bars = [tqdm(total=total, desc=f"chain {job.index}", position=job.index, unit="draw",
                 disable=not progress, leave=True) for job in jobs]

    def advance(chain, stage):
        bars[chain].update(1)
        bars[chain].set_postfix(stage=stage.split()[0].lower())

    try:
        if processes == 1:
            return [run_chain(job, advance) for job in jobs]
        import multiprocessing
        import queue as queues
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, ProcessPoolExecutor(processes,
                                                               mp_context=context) as pool:
            channel = manager.Queue()
            futures = [pool.submit(_run_chain_reporting, job, channel) for job in jobs]
            while not all(f.done() for f in futures):
                try:
                    advance(*channel.get(timeout=0.2))
                except queues.Empty:
                    pass
            while not channel.empty():
                advance(*channel.get())
            return [f.result() for f in futures]
    finally:
        for bar in bars:
            bar.close()


def approximation(h: Hierarchy, config: NUTSConfig, svi: SVIConfig, seed: int,
                  progress: bool, map_config: MAPConfig = MAPConfig()) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Centre and covariance (packed unconstrained coordinates of ``h``) that NUTS starts
    from: the Laplace approximation, or the full-rank SVI guide started from it, fitted in
    the non-centered parameterisation and carried over to the centered one if ``h`` is
    centered (covariance ``J C J^T``). Also returns the fit's iteration count and the
    integration steps per recorded interval, refined at the MAP where ``h``'s grid misses
    its tolerance there (:func:`~bayescal.inference.accuracy.replan_at_map`)."""
    start = h if not h.centered else h.with_grid(h.substeps, centered=False)
    result = run_svi(start, replace(svi, guide="mvn"), map_config, seed=seed,
                     progress=progress,
                     replan=replan_at_map if h.options.automatic else None,
                     svi_stage=config.init == "svi")
    start = result.hierarchy
    if config.init == "svi":
        posterior = result.guide.get_posterior()
        centre, covariance = posterior.loc.detach(), posterior.covariance_matrix.detach()
    else:
        centre, covariance = result.state.u_map, result.state.covariance
    if h.centered:
        packing = Packing(start, initial_values(start))
        jacobian = torch.autograd.functional.jacobian(
            lambda v: to_centered(packing, v[None])[0], centre)
        centre = to_centered(packing, centre[None])[0]
        covariance = jacobian @ covariance @ jacobian.T
    return centre, covariance, result.state.total, start.substeps


def run_nuts(h: Hierarchy, config: NUTSConfig = NUTSConfig(), svi: SVIConfig = SVIConfig(),
             seed: int = 0, progress: bool = True,
             map_config: MAPConfig = MAPConfig()) -> NUTSResult:
    """Sample the hierarchy's posterior with NUTS (see the module's docstring)."""
    start = time.perf_counter()
    centre, covariance, init_steps, substeps = approximation(h, config, svi, seed, progress,
                                                             map_config)
    root = torch.linalg.cholesky(0.5 * (covariance + covariance.T))
    init_time = time.perf_counter() - start
    jobs = [_Chain(h.spec, h.experiments, h.options, substeps, h.centered, centre, root, config,
                   seed, chain, torch.get_num_threads()) for chain in range(config.chains)]
    processes = config.processes or min(config.chains, os.cpu_count() or 1)
    chains = _run_chains(jobs, processes, progress)
    stats = {name: np.asarray([c["stats"][name] for c in chains]) for name in STAT_NAMES}
    return NUTSResult(
        u=torch.stack([c["u"] for c in chains]),
        stats=stats,
        warmup_solver_failures=sum(c["warmup_failures"] for c in chains),
        solver_retries=sum(c["retries"] for c in chains),
        init_time=init_time,
        sampling_time=time.perf_counter() - start - init_time,
        init_steps=init_steps,
        substeps=substeps,
    )
