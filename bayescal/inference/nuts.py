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
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer.mcmc import MCMC, NUTS
from pyro.ops.integrator import register_exception_handler

from bayescal.adapters import nuts_transition
from bayescal.card import ModelSpec
from bayescal.data import Experiments
from bayescal.distributed import Communicator
from bayescal.errors import BayescalWarning, InvalidSetting
from bayescal.hierarchy import Hierarchy, SolverFailure, Solving
from bayescal.inference.accuracy import replan_at_map
from bayescal.inference.checkpoints import (NUTS_CHAIN_FIELDS, NUTS_START_FIELDS,
                                            corrupt_checkpoint, nuts_chain_path,
                                            nuts_start_path, read_plain, rng_state,
                                            set_rng_state, write_plain)
from bayescal.inference.laplace import MAPConfig
from bayescal.inference.packing import Packing, initial_values, to_centered, to_centered_jacobian
from bayescal.inference.parameterisation import choose_centered, specimen_sd_ratios
from bayescal.inference.parameterisation import describe as describe_parameterisation
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
    checkpoint_every: int = 25  # sampling draws between a chain's checkpoints

    def __post_init__(self) -> None:
        for name in ("chains", "samples", "max_tree_depth", "checkpoint_every"):
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
    centered: frozenset[str]  # the parameters sampled centered
    sd_ratios: dict[str, float]  # specimen sd / population scale at the Laplace point


@dataclass(frozen=True)
class _Chain:
    """What one chain's process needs (picklable)."""

    spec: ModelSpec
    experiments: Experiments
    options: SolverOptions
    substeps: torch.Tensor
    centered: frozenset[str]
    centre: torch.Tensor
    root: torch.Tensor
    config: NUTSConfig
    seed: int
    index: int
    threads: int
    checkpoint: Path | None = None  # where the chain's state is written
    fingerprint: dict | None = None  # what the state is stamped with (the run's)
    resume: dict | None = None  # a state to go on from (NUTS_CHAIN_FIELDS)
    comm: Communicator | None = None  # several ranks: the chain's solves are sharded


class _Potential:
    """``w -> -log p(centre + root w)``, counting evaluations and solver failures.

    Each solve's Newton starts from the trajectory of the previous evaluation
    (``last_states``): successive leapfrog points differ by a fraction of the posterior's
    width, so the last trajectory is a far better start than the step predictor's
    extrapolation, above all in long chunks (the NUTS benchmark's one chunk per path took
    4.3x less time per gradient, ``benchmarks/README.md``, NUTS). The log density agrees with
    a fresh start's to Newton's tolerance (rtol 1e-12)."""

    def __init__(self, packing: Packing, centre: torch.Tensor, root: torch.Tensor) -> None:
        self.packing, self.centre, self.root = packing, centre, root
        self.evaluations = 0
        self.failures = 0
        self.retries = 0
        self.last_states: torch.Tensor | None = None

    def __call__(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        self.evaluations += 1
        u = self.centre + self.root @ params["w"]
        solving = Solving(warm_start=True, previous=self.last_states)
        try:
            return -self.packing.log_joint(u[None], solving)[0]
        except SolverFailure:
            self.failures += 1
            raise
        finally:
            self.retries += solving.retries
            self.last_states = solving.previous


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


class _ResumedNUTS(NUTS):
    """Pyro's NUTS with a step size and mass matrix fixed at a checkpoint's (no adaptation):
    a chain's sampling phase, resumed."""

    def __init__(self, potential_fn, step_size: float, inverse_mass: torch.Tensor,
                 **kwargs) -> None:
        super().__init__(potential_fn=potential_fn, step_size=step_size, adapt_step_size=False,
                         adapt_mass_matrix=False, **kwargs)
        self.resumed_inverse_mass = inverse_mass

    def setup(self, warmup_steps, *args, **kwargs):
        super().setup(warmup_steps, *args, **kwargs)
        self.mass_matrix_adapter.inverse_mass_matrix = {("w",): self.resumed_inverse_mass}


def _saturated(steps: int, max_tree_depth: int) -> bool:
    """Whether a transition of ``steps`` gradient evaluations ran to the maximum tree depth."""
    return steps >= 2 ** max_tree_depth - 1


def run_chain(job: _Chain, report=None) -> dict:
    """One chain; ``report(chain, stage, saturated)`` is called after each draw (saturated:
    the draw ran to the maximum tree depth). Returns its draws of ``u`` and per-draw
    statistics (sampling phase), and warm-up counts. With ``job.checkpoint`` the chain's
    state is written there at the end of warm-up and every ``config.checkpoint_every`` draws;
    with ``job.resume`` (such a state) it goes on from there without warm-up. Runs in the
    calling process as it is set up (float64 is bayescal's precision: see
    :func:`_run_chain_reporting` for a worker process)."""
    h = Hierarchy(job.spec, job.experiments, job.options, centered=job.centered,
                  substeps=job.substeps, comm=job.comm)
    packing = Packing(h, initial_values(h))
    potential = _Potential(packing, job.centre, job.root)
    config = job.config
    options = dict(full_mass=config.dense, target_accept_prob=config.target_accept,
                   max_tree_depth=config.max_tree_depth)
    resumed = job.resume
    if resumed is None:
        seed = _chain_seed(job.seed, job.index)
        pyro.set_rng_seed(seed)
        w0 = _start(potential, packing.dim, seed)
        kernel = NUTS(potential_fn=potential, step_size=0.5, adapt_step_size=True,
                      adapt_mass_matrix=True, **options)
        draws, stats, warmup = [], {name: [] for name in STAT_NAMES}, config.warmup
        counts = {"warmup_failures": 0, "retries": 0}
    else:
        set_rng_state(resumed["rng"])
        w0 = resumed["w"]
        kernel = _ResumedNUTS(potential, resumed["step_size"], resumed["inverse_mass"],
                              **options)
        draws = list(resumed["draws"])
        stats = {name: list(resumed["stats"][name]) for name in STAT_NAMES}
        warmup = 0
        counts = {"warmup_failures": resumed["warmup_failures"], "retries": resumed["retries"]}
    marks = {"evaluations": potential.evaluations, "failures": potential.failures,
             "divergences": 0, "accept": 0.0}

    def save(kernel, w: torch.Tensor) -> None:
        if job.checkpoint is None:
            return
        inverse_mass = next(iter(kernel.inverse_mass_matrix.values()))
        write_plain(job.checkpoint, job.fingerprint, {
            "w": w.detach().clone(), "step_size": float(kernel.step_size),
            "inverse_mass": inverse_mass.detach().clone(),
            "draws": torch.stack(draws) if draws else torch.zeros(0, packing.dim,
                                                                  dtype=torch.float64),
            "stats": {name: list(values) for name, values in stats.items()},
            "warmup_failures": counts["warmup_failures"],
            "retries": counts["retries"] + potential.retries, "rng": rng_state()})

    def hook(kernel, params, stage, i):
        steps = potential.evaluations - marks["evaluations"]
        failures = potential.failures - marks["failures"]
        marks["evaluations"], marks["failures"] = potential.evaluations, potential.failures
        if stage.startswith("Warmup"):
            counts["warmup_failures"] += failures
            if i == warmup - 1:
                save(kernel, params["w"])
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
            draws.append(params["w"].detach().clone())
            if len(draws) % config.checkpoint_every == 0:
                save(kernel, params["w"])
        if report is not None:
            report(job.index, stage, _saturated(steps, config.max_tree_depth))

    remaining = config.samples - len(draws)
    if remaining > 0:
        mcmc = MCMC(kernel, num_samples=remaining, warmup_steps=warmup,
                    initial_params={"w": w0}, hook_fn=hook, disable_progbar=True)
        mcmc.run()
    w = torch.stack(draws)
    return {"u": (job.centre + w @ job.root.T).detach(), "stats": stats,
            "warmup_failures": counts["warmup_failures"],
            "retries": counts["retries"] + potential.retries}


def _run_chain_reporting(job: _Chain, queue) -> dict:
    """:func:`run_chain` in a worker process of its own (float64, the parent's thread count),
    reporting progress through ``queue``."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(job.threads)
    return run_chain(job, lambda *message: queue.put(message))


#: Warm-up draws over which a stall is judged, and the share of them at the maximum tree
#: depth that makes one: such a chain takes the most gradient evaluations per draw there are,
#: and at the solver's cost per evaluation a run of hundreds of draws takes hours.
STALL_WINDOW = 20
STALL_SHARE = 0.5


class StallWatch:
    """Says in plain words, once, when warm-up stalls: when :data:`STALL_SHARE` of a chain's
    first :data:`STALL_WINDOW` warm-up draws run to the maximum tree depth."""

    def __init__(self, config: NUTSConfig, parameterisation: str) -> None:
        self.config, self.parameterisation = config, parameterisation
        self.seen: dict[int, list[bool]] = {}
        self.warned = False

    def __call__(self, chain: int, stage: str, saturated: bool) -> None:
        if self.warned or not stage.startswith("Warmup"):
            return
        seen = self.seen.setdefault(chain, [])
        if len(seen) >= STALL_WINDOW:
            return
        seen.append(saturated)
        if len(seen) == STALL_WINDOW and sum(seen) >= STALL_SHARE * STALL_WINDOW:
            self.warned = True
            depth = self.config.max_tree_depth
            warnings.warn(
                f"NUTS warm-up is stalling: {sum(seen)} of the first {STALL_WINDOW} warm-up "
                f"draws of chain {chain} ran to the maximum tree depth ({depth}, "
                f"{2 ** depth - 1} gradient evaluations each). The posterior is badly curved "
                f"in the parameterisation sampled ({self.parameterisation}); at this pace the "
                "run takes hours. Try the other parameterisation (--centered or "
                "--non-centered), --init svi, or look at a --method laplace fit first.",
                BayescalWarning, stacklevel=2)


def _run_chains(jobs: list[_Chain], processes: int, progress: bool,
                watch: StallWatch | None = None) -> list[dict]:
    """Run the chains, ``processes`` at a time (spawned processes when more than one), with
    a progress bar per chain; ``watch`` hears of every draw."""
    from tqdm.auto import tqdm

    total = jobs[0].config.warmup + jobs[0].config.samples
    bars = [tqdm(total=total, desc=f"chain {job.index}", position=job.index, unit="draw",
                 disable=not progress, leave=True,
                 initial=0 if job.resume is None else
                 job.config.warmup + len(job.resume["draws"])) for job in jobs]

    def advance(chain, stage, saturated=False):
        bars[chain].update(1)
        bars[chain].set_postfix(stage=stage.split()[0].lower())
        if watch is not None:
            watch(chain, stage, saturated)

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


@dataclass(frozen=True)
class Approximation:
    """Where NUTS starts: ``centre`` and ``covariance`` in the packed coordinates of the
    chosen parameterisation (``centered``: the parameters sampled centered), the integration
    grid (per recorded interval) refined at the MAP, the fit's iteration count, and each
    varying parameter's ratio of a specimen's posterior sd to the population scale
    (:func:`~bayescal.inference.parameterisation.specimen_sd_ratios`)."""

    centre: torch.Tensor
    covariance: torch.Tensor
    centered: frozenset[str]
    substeps: torch.Tensor
    steps: int
    sd_ratios: dict[str, float]


def approximation(h: Hierarchy, config: NUTSConfig, svi: SVIConfig, seed: int,
                  progress: bool, map_config: MAPConfig = MAPConfig(),
                  automatic: bool = False) -> Approximation:
    """The Laplace approximation, or the full-rank SVI guide started from it, fitted in the
    non-centered parameterisation, then carried over (covariance ``J C J^T``) to the one
    sampled: ``h``'s, or with ``automatic`` the one the data call for, per parameter
    (:func:`~bayescal.inference.parameterisation.choose_centered`, at the Laplace point).
    The grid is refined at the MAP where ``h``'s misses its tolerance there
    (:func:`~bayescal.inference.accuracy.replan_at_map`)."""
    start = h.with_grid(h.substeps, centered=False) if h.centered else h
    result = run_svi(start, replace(svi, guide="mvn"), map_config, seed=seed,
                     progress=progress,
                     replan=replan_at_map if h.options.automatic else None,
                     svi_stage=config.init == "svi")
    start = result.hierarchy
    packing = Packing(start, initial_values(start))
    ratios = specimen_sd_ratios(packing, result.state.u_map, result.state.covariance)
    centered = choose_centered(ratios) if automatic else h.centered
    if config.init == "svi":
        posterior = result.guide.get_posterior()
        centre, covariance = posterior.loc.detach(), posterior.covariance_matrix.detach()
    else:
        centre, covariance = result.state.u_map, result.state.covariance
    if centered:
        jacobian = to_centered_jacobian(packing, centre, centered)
        centre = to_centered(packing, centre[None], centered)[0]
        covariance = jacobian @ covariance @ jacobian.T
    return Approximation(centre, covariance, frozenset(centered), start.substeps,
                         result.state.total, ratios)


def run_nuts(h: Hierarchy, config: NUTSConfig = NUTSConfig(), svi: SVIConfig = SVIConfig(),
             seed: int = 0, progress: bool = True,
             map_config: MAPConfig = MAPConfig(), automatic: bool = False,
             checkpoint_folder: Path | None = None, resume: bool = False,
             fingerprint: dict[str, str] | None = None) -> NUTSResult:
    """Sample the hierarchy's posterior with NUTS (see the module's docstring); with
    ``automatic`` each varying parameter is sampled centered or not as the data call for
    (:func:`approximation`).

    With ``checkpoint_folder`` the starting approximation and each chain's state are kept
    there (:mod:`bayescal.inference.checkpoints`), stamped with ``fingerprint``; with
    ``resume`` the run takes its start from there and every chain with a state goes on from
    it (a chain killed during warm-up starts again). Without ``resume``, earlier files there
    are replaced, with a :class:`~bayescal.errors.BayescalWarning`.
    """
    fingerprint = dict(fingerprint or {})
    start = time.perf_counter()
    comm = h.comm
    writer = comm is None or comm.writer
    start_file = None if checkpoint_folder is None else nuts_start_path(checkpoint_folder)
    chain_files = [None if checkpoint_folder is None else nuts_chain_path(checkpoint_folder, k)
                   for k in range(config.chains)]
    if start_file is not None and not resume and writer:
        earlier = [p for p in (start_file, *chain_files) if p.exists()]
        if earlier:
            warnings.warn(f"{checkpoint_folder} holds the checkpoints of an earlier NUTS run; "
                          "this run replaces them (to continue that run instead, rerun it "
                          "with --resume)", BayescalWarning, stacklevel=2)
            for path in earlier:
                path.unlink()
    if resume and start_file is not None and start_file.exists():
        saved = read_plain(start_file, fingerprint, NUTS_START_FIELDS)
        approx = Approximation(saved["centre"], saved["root"] @ saved["root"].T,
                               frozenset(saved["centered"]), saved["substeps"], saved["steps"],
                               saved["sd_ratios"])
        root, init_time = saved["root"], saved["init_time"]
        if comm is not None:  # every rank has read it before rank 0 replaces anything
            comm.barrier()
    else:
        approx = approximation(h, config, svi, seed, progress, map_config, automatic)
        root = torch.linalg.cholesky(0.5 * (approx.covariance + approx.covariance.T))
        init_time = time.perf_counter() - start
        if start_file is not None and writer:
            write_plain(start_file, fingerprint, {
                "centre": approx.centre, "root": root, "substeps": approx.substeps,
                "centered": sorted(approx.centered), "steps": approx.steps,
                "sd_ratios": dict(approx.sd_ratios), "init_time": float(init_time)})
    jobs = []
    for chain, path in enumerate(chain_files):
        state = None
        if resume and path is not None and path.exists():
            state = read_plain(path, fingerprint, NUTS_CHAIN_FIELDS)
            if state["draws"].shape[1:] != approx.centre.shape or \
                    state["draws"].shape[0] > config.samples:
                raise corrupt_checkpoint(path, "its draws do not fit this run")
        jobs.append(_Chain(h.spec, h.experiments, h.options, approx.substeps, approx.centered,
                           approx.centre, root, config, seed, chain, torch.get_num_threads(),
                           checkpoint=path if writer else None, fingerprint=fingerprint,
                           resume=state, comm=comm))
    if comm is not None:  # every rank has read its chain states before rank 0 writes them
        comm.barrier()
    # on several ranks the chains run one after another, each sharded over every rank (a
    # chain's solves are collective operations of the whole group)
    processes = 1 if comm is not None else (
        config.processes or min(config.chains, os.cpu_count() or 1))
    watch = StallWatch(config, describe_parameterisation(h.spec.varying, approx.centered))
    sampling_start = time.perf_counter()
    chains = _run_chains(jobs, processes, progress, watch)
    stats = {name: np.asarray([c["stats"][name] for c in chains]) for name in STAT_NAMES}
    return NUTSResult(
        u=torch.stack([c["u"] for c in chains]),
        stats=stats,
        warmup_solver_failures=sum(c["warmup_failures"] for c in chains),
        solver_retries=sum(c["retries"] for c in chains),
        init_time=init_time,
        sampling_time=time.perf_counter() - sampling_start,
        init_steps=approx.steps,
        substeps=approx.substeps,
        centered=approx.centered,
        sd_ratios=approx.sd_ratios,
    )
