"""The SVI loop: MAP (+ Laplace), then Adam on the ELBO of a guide started there.

A fit has two stages: the MAP by damped Newton with the Laplace approximation at it
(:mod:`bayescal.inference.laplace`), then, unless the guide is ``delta``, the guide
(:mod:`bayescal.inference.guides`) initialised at the MAP point with the Laplace covariance
and refined by Adam on the ELBO with vectorised particles (particles and specimens share one
batched solve), a decaying learning rate and a plateau stop.

Pyro's default initialisation would put bounded values at their bounds; starting from the
Laplace approximation also avoids the over-confident intervals that a guide started with a
tiny scale tends to keep. A step whose solve fails, or whose gradient is not finite, is
skipped and counted; it never reaches the optimiser.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from bayescal.errors import BayescalWarning, InvalidSetting
from bayescal.hierarchy import Hierarchy, SolverFailure, Solving
from bayescal.inference.checkpoints import (Checkpointer, FitState, corrupt_checkpoint, describe_checkpoint,
                                            load_checkpoint, set_rng_state, state_from_dict)
from bayescal.inference.guides import GUIDES, make_guide
from bayescal.inference.laplace import MAPConfig, fit_map
from bayescal.inference.packing import Packing, initial_values


@dataclass(frozen=True)
class SVIConfig:
    """Settings of one fit. ``steps`` bounds the SVI stage, which stops earlier on a plateau
    of the ELBO; the learning rate decays geometrically to ``lr * lr_final``. The guide starts
    with ``laplace_scale`` times the Laplace covariance (a guide started with a tiny
    scale keeps over-confident intervals: see benchmarks/README.md, SVI)."""

    guide: str = "mvn"
    steps: int = 1000
    lr: float = 0.01
    lr_final: float = 0.1
    particles: int = 8
    laplace_scale: float = 1.0
    window: int = 50
    min_steps: int = 100
    clip_norm: float = 10.0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.guide not in GUIDES:
            raise InvalidSetting("guide", f"{self.guide!r} is unknown; choose one of "
                                 f"{', '.join(GUIDES)}", "SVI")
        if self.min_steps < 0:
            raise InvalidSetting("min_steps", f"must be 0 or more, got {self.min_steps}", "SVI")
        for name in ("steps", "particles", "window", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InvalidSetting(name, f"must be at least 1, got {getattr(self, name)}",
                                     "SVI")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidSetting("lr", f"must be a positive finite number, got {self.lr}", "SVI")


@dataclass
class SVIResult:
    """A fitted guide with its history."""

    guide: Callable
    state: FitState
    map_values: dict
    wall_time: float
    resumed_from: int | None = None
    hierarchy: Hierarchy | None = None  # the one fitted: a finer grid after a re-plan


def plateaued(losses: list[float], window: int) -> bool:
    """True when the mean loss of the last window is no better than the one before it,
    within the noise of the two means."""
    if len(losses) < 2 * window:
        return False
    last = torch.tensor(losses[-window:])
    prev = torch.tensor(losses[-2 * window:-window])
    gain = float(prev.mean() - last.mean())
    return gain < math.sqrt(float(last.var() + prev.var()) / window)


def refine_guide(h: Hierarchy, guide, config: SVIConfig, state: FitState, optim_state,
                 checkpoint: Callable | None, progress) -> None:
    """Adam on the ELBO from the guide's current state, until a plateau or ``config.steps``."""
    elbo = Trace_ELBO(num_particles=config.particles,
                      vectorize_particles=config.particles > 1, max_plate_nesting=1)
    decay = config.lr_final ** (1.0 / config.steps)
    optim = pyro.optim.ClippedAdam({"lr": config.lr, "lrd": decay, "clip_norm": config.clip_norm})
    if optim_state is not None:
        optim.set_state(optim_state)
    losses = state.losses["guide"]
    while state.step < config.steps:
        solving = Solving()
        with poutine.trace(param_only=True) as capture:
            try:
                loss = elbo.differentiable_loss(h, guide, solving=solving)
                loss.backward()
                ok = bool(torch.isfinite(loss))
            except SolverFailure:
                ok = False
        params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
        state.retries += solving.reports[-1].retries if solving.reports else 0
        if ok and all(p.grad is None or torch.isfinite(p.grad).all() for p in params):
            optim(params)
            losses.append(float(loss.detach()))
        else:
            state.skipped += 1
        pyro.infer.util.zero_grads(params)
        state.step += 1
        if progress is not None:
            progress.update(1)
            if losses:
                progress.set_postfix(stage=f"svi {config.guide}", loss=f"{losses[-1]:.6g}",
                                     skipped=state.skipped)
        if checkpoint is not None and state.step % config.checkpoint_every == 0:
            checkpoint(state, guide, optim)
        if state.step >= config.min_steps and plateaued(losses, config.window):
            break


def _refined_packing(replan: Callable[[Hierarchy, dict], Hierarchy | None], packing: Packing,
                     u: torch.Tensor) -> Packing | None:
    """``replan`` at the point ``u`` of ``packing``, as a packing (None: no change)."""
    finer = replan(packing.h, packing.point(u))
    return None if finer is None else Packing(finer, initial_values(finer))


def run_svi(h: Hierarchy, config: SVIConfig = SVIConfig(), map_config: MAPConfig = MAPConfig(),
            seed: int = 0,
            checkpoint_path: Path | None = None, resume: bool = False,
            progress: bool = True, fingerprint: dict[str, str] | None = None,
            replan: Callable[[Hierarchy, dict], Hierarchy | None] | None = None,
            svi_stage: bool = True) -> SVIResult:
    """Fit the hierarchy: MAP (+ Laplace), then SVI of the chosen guide unless ``delta`` or
    not ``svi_stage`` (the guide at the Laplace approximation).

    ``replan(h, map_values)``, called once near the MAP, may return a hierarchy on a finer
    integration grid (see :func:`bayescal.inference.accuracy.replan_at_map`): Newton then
    goes on from the same point on it, and everything after uses it
    (``SVIResult.hierarchy``).

    With ``checkpoint_path`` the state is written there after every MAP (Newton) iteration,
    after the MAP stage and every ``checkpoint_every`` SVI steps, stamped with
    ``fingerprint`` (what identifies the run: see :func:`bayescal.fit.run_fingerprint`);
    with ``resume`` a run continues from that file, which must carry the same fingerprint
    (:func:`load_checkpoint`). A run without ``resume`` that replaces an earlier run's
    checkpoint says so (a :class:`~bayescal.errors.BayescalWarning`).
    """
    from tqdm.auto import tqdm

    fingerprint = dict(fingerprint or {})
    start = time.perf_counter()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    packing = Packing(h, initial_values(h))
    saved = None
    if checkpoint_path is not None and checkpoint_path.exists():
        if resume:
            saved = load_checkpoint(checkpoint_path, fingerprint, packing.dim)
            set_rng_state(saved["rng"])
        elif h.comm is None or h.comm.writer:
            warnings.warn(f"{checkpoint_path} holds {describe_checkpoint(checkpoint_path)}; "
                          "this run replaces it (to continue that run instead, rerun it "
                          "with --resume)", BayescalWarning, stacklevel=2)
    if h.comm is not None:  # every rank has read the checkpoint before rank 0 replaces it
        h.comm.barrier()
    state = state_from_dict(saved["state"]) if saved else FitState()
    resumed_from = state.total if saved else None
    writes = checkpoint_path is not None and (h.comm is None or h.comm.writer)
    writer = Checkpointer(checkpoint_path, fingerprint) if writes else None
    stochastic = config.guide != "delta" and svi_stage
    with tqdm(total=map_config.iterations + (config.steps if stochastic else 0),
              disable=not progress, desc="fit", unit="it") as bar:
        if state.stage == "map":
            bar.update(len(state.losses["map"]))
            map_checkpoint = None if writer is None else (lambda s: writer(s, None, None))
            refine = None if replan is None else (
                lambda p, u: _refined_packing(replan, p, u))
            state.u_map, state.covariance, packing = fit_map(
                packing, state, map_config, bar,
                map_checkpoint, refine)
            h = packing.h
            state.stage = "guide"
            if writer is not None:
                writer(state, None, None)
        bar.n = map_config.iterations
        guide = make_guide(h, config.guide, packing, state.u_map,
                           config.laplace_scale * state.covariance)
        if stochastic:
            if saved is not None and saved["guide"] is not None:
                try:
                    guide.load_state_dict(saved["guide"])
                except (RuntimeError, KeyError, TypeError, ValueError) as exc:
                    raise corrupt_checkpoint(checkpoint_path, f"guide state: {exc}") from None
            bar.update(state.step)
            refine_guide(h, guide, config, state, saved and saved["optim"], writer, bar)
    return SVIResult(guide=guide, state=state, map_values=packing.point(state.u_map),
                     wall_time=time.perf_counter() - start, resumed_from=resumed_from,
                     hierarchy=h)
