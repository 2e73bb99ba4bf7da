"""MAP and SVI through the chunked adjoint: guides, warm start, schedule, plateau stop,
checkpoints.

:func:`run_svi` fits one guide. Every guide except ``delta`` is warm-started from a MAP fit
(Pyro's default initialisation would put bounded values at their bounds), and all stochastic
guides use several vectorised particles: they cost almost nothing extra, because particles
and specimens share one batched solve. A step whose solve fails, or whose gradient is not
finite, is skipped and counted; it never reaches the optimiser.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import (AutoDelta, AutoLowRankMultivariateNormal,
                                  AutoMultivariateNormal, AutoNormal)
from pyro.infer.autoguide.initialization import init_to_median, init_to_value

from bayescal.hierarchy import Hierarchy, SolverFailure

GUIDES = ("delta", "normal", "lowrank", "mvn")


@dataclass(frozen=True)
class SVIConfig:
    """Settings of one SVI run. ``steps`` is the maximum; the run stops earlier on a
    plateau of the ELBO. The learning rate decays geometrically to ``lr * lr_final``."""

    guide: str = "mvn"
    steps: int = 1500
    lr: float = 0.02
    lr_final: float = 0.1
    particles: int = 8
    map_steps: int = 600
    init_scale: float = 0.02
    window: int = 50
    min_steps: int = 200
    clip_norm: float = 10.0
    checkpoint_every: int = 50


@dataclass
class SVIState:
    """Everything needed to continue a run: the stage, steps taken in it and in all, losses."""

    stage: str = "map"
    step: int = 0
    total: int = 0
    losses: dict = field(default_factory=lambda: {"map": [], "guide": []})
    skipped: int = 0
    retries: int = 0


@dataclass
class SVIResult:
    """A fitted guide with its history."""

    guide: Callable
    state: SVIState
    map_values: dict
    wall_time: float
    resumed_from: int | None = None


def initial_values(h: Hierarchy) -> dict[str, torch.Tensor]:
    """Starting point: prior centres (or a card's initial value), specimens at the population
    mean, half the prior spread and half the prior noise scale."""
    values = {}
    for name in h.spec.calibrated:
        p = h.spec.parameters[name]
        centre = p.value if p.value is not None else p.prior[0]
        z = h.transforms[name].inverse(centre)
        if p.varies == "shared":
            values[f"{name}_z"] = z
        else:
            values[f"{name}_pop_z"] = z
            values[f"{name}_cv"] = torch.tensor(p.spread / 2, dtype=torch.float64)
            shape = (h.experiments.n_specimens,)
            values[f"{name}_offset" if not h.centered else f"{name}_z"] = (
                torch.zeros(shape, dtype=torch.float64) if not h.centered else z.expand(shape))
    values["noise_sd"] = torch.tensor(h.spec.noise_prior_scale / 2, dtype=torch.float64)
    return values


def make_guide(h: Hierarchy, kind: str, init: dict, init_scale: float):
    """An autoguide of the given kind, located at ``init``."""
    loc = init_to_value(values=init, fallback=init_to_median)
    if kind == "delta":
        return AutoDelta(h, init_loc_fn=loc)
    if kind == "normal":
        return AutoNormal(h, init_loc_fn=loc, init_scale=init_scale)
    if kind == "lowrank":
        return AutoLowRankMultivariateNormal(h, init_loc_fn=loc, init_scale=init_scale)
    if kind == "mvn":
        return AutoMultivariateNormal(h, init_loc_fn=loc, init_scale=init_scale)
    raise ValueError(f"unknown guide {kind!r}; choose one of {', '.join(GUIDES)}")


def plateaued(losses: list[float], window: int, deterministic: bool) -> bool:
    """True when the mean loss of the last window is no better than the one before it,
    within the noise of the two means (or 1e-5 relative for a deterministic loss)."""
    if len(losses) < 2 * window:
        return False
    last = torch.tensor(losses[-window:])
    prev = torch.tensor(losses[-2 * window:-window])
    gain = float(prev.mean() - last.mean())
    if deterministic:
        return gain < 1e-5 * abs(float(last.mean())) + 1e-3
    noise = math.sqrt(float(last.var() + prev.var()) / window)
    return gain < noise


def _stage(h, guide, config: SVIConfig, state: SVIState, max_steps: int,
           optim_state, checkpoint: Callable | None, progress) -> None:
    """Run (or continue) the current optimisation stage in place."""
    stage = state.stage
    particles = 1 if stage == "map" else config.particles
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1,
                      max_plate_nesting=1)
    decay = config.lr_final ** (1.0 / max_steps)
    optim = pyro.optim.ClippedAdam({"lr": config.lr, "lrd": decay, "clip_norm": config.clip_norm})
    if optim_state is not None:
        optim.set_state(optim_state)
    losses = state.losses[stage]
    while state.step < max_steps:
        with poutine.trace(param_only=True) as capture:
            try:
                loss = elbo.differentiable_loss(h, guide)
                loss.backward()
                ok = bool(torch.isfinite(loss))
            except SolverFailure:
                ok = False
        params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
        if h.last_report is not None:
            state.retries += h.last_report.retries
        if ok and all(p.grad is None or torch.isfinite(p.grad).all() for p in params):
            optim(params)
            losses.append(float(loss.detach()))
        else:
            state.skipped += 1
        pyro.infer.util.zero_grads(params)
        state.step += 1
        state.total += 1
        if progress is not None:
            progress.update(1)
            if losses:
                progress.set_postfix(stage=stage, loss=f"{losses[-1]:.5g}", skipped=state.skipped)
        if checkpoint is not None and state.total % config.checkpoint_every == 0:
            checkpoint(state, guide, optim)
        if state.step >= config.min_steps and plateaued(losses, config.window, stage == "map"):
            break


def run_svi(h: Hierarchy, config: SVIConfig = SVIConfig(), seed: int = 0,
            checkpoint_path: Path | None = None, resume: bool = False,
            progress: bool = True) -> SVIResult:
    """Fit the hierarchy by MAP (``delta``) or by SVI warm-started from MAP.

    With ``checkpoint_path`` the state is written there every ``checkpoint_every`` steps;
    with ``resume`` a run continues from that file when it exists.
    """
    from tqdm.auto import tqdm

    if config.guide not in GUIDES:
        raise ValueError(f"unknown guide {config.guide!r}; choose one of {', '.join(GUIDES)}")
    start = time.perf_counter()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    saved = None
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        saved = torch.load(checkpoint_path, weights_only=False)
        pyro.util.set_rng_state(saved["rng"])
    state = saved["state"] if saved else SVIState()
    resumed_from = state.total if saved else None
    writer = _Checkpointer(checkpoint_path) if checkpoint_path is not None else None
    total = config.map_steps + (0 if config.guide == "delta" else config.steps)
    with tqdm(total=total, disable=not progress, desc=f"fit ({config.guide})", unit="step") as bar:
        if state.stage == "map":
            guide = make_guide(h, "delta", initial_values(h), config.init_scale)
            _restore(guide, saved, h)
            bar.update(state.step)
            _stage(h, guide, config, state, config.map_steps, saved and saved["optim"],
                   writer, bar)
            map_values = _point(guide)
            bar.update(config.map_steps - state.step)
            if config.guide != "delta":
                state.stage, state.step = "guide", 0
                saved = None
        else:
            map_values = saved["map_values"]
            bar.update(config.map_steps)
        if writer is not None:
            writer.map_values = map_values
        if config.guide != "delta":
            guide = make_guide(h, config.guide, map_values, config.init_scale)
            _restore(guide, saved, h)
            bar.update(state.step)
            _stage(h, guide, config, state, config.steps, saved and saved["optim"], writer, bar)
    return SVIResult(guide=guide, state=state, map_values=map_values,
                     wall_time=time.perf_counter() - start,
                     resumed_from=resumed_from)


def _point(guide: AutoDelta) -> dict[str, torch.Tensor]:
    """The MAP point as a dict of latent values."""
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in guide.median().items()}


def _restore(guide, saved, h) -> None:
    """Set up a guide's parameters and, when resuming, load them from a checkpoint."""
    with poutine.block(), torch.no_grad():
        guide._setup_prototype()
    if saved is not None:
        guide.load_state_dict(saved["guide"])


class _Checkpointer:
    """Writes the run's state atomically every few steps."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.map_values = None

    def __call__(self, state: SVIState, guide, optim) -> None:
        payload = {"state": state, "guide": guide.state_dict(), "optim": optim.get_state(),
                   "map_values": self.map_values, "rng": pyro.util.get_rng_state()}
        tmp = self.path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)
