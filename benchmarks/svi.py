"""Benchmark: MAP, Laplace and SVI guides on one synthetic hierarchical problem.

The problem is the one of ``tests/test_fit.py``, imported from there: ``synthetic(n_specimens,
seed, points_per_segment)`` puts specimens drawn from a known population (population means
``TRUE_MEANS``, 8 % coefficient of variation, Gaussian noise of sd 2 MPa) on the test's
load path (``RECOVERY_SEGMENTS`` at the time of writing: two rates, a relaxation hold, an
unload and a reload to 16 % strain), for the ``perzyna-voce`` card
``models/perzyna-voce.toml`` (sy, Rinf, d and eta vary by specimen). Default: 12 specimens,
30 recorded points per segment (151 recorded points), data seed 11, fit seed 0. The git
commit (and a hash of any uncommitted change under ``bayescal/`` and ``tests/``) is stored
with the results.

Three measurements:

1. **Guides.** For each guide (``delta`` = MAP only, ``normal``, ``lowrank``, ``mvn``),
   :func:`bayescal.inference.svi.run_svi` with the default :class:`SVIConfig` (only the
   guide changed): wall and CPU time, the time of the MAP stage (damped Newton; its last
   Hessian is the Laplace covariance) and of the SVI stage (timed by wrapping ``fit_map`` and
   ``refine_guide``), Newton iterations, MAP evaluations (points at which the log joint was
   evaluated: ``1 + 2 dim`` gradients per iteration plus the line-search points, counted by
   wrapping ``Packing.log_joint``), SVI steps and seconds per SVI step, the relative error of
   the posterior-mean population mean ``P_pop_mean`` per parameter against the true
   population mean and against the sample mean of the specimens actually drawn (max over
   parameters), the relative error of the posterior-mean noise sd, and, from 400 posterior
   draws, the coverage of the 90 % intervals (fraction of the specimen x parameter truths
   inside the 5 %-95 % quantiles) and the mean interval width relative to the true value.
   The same numbers for the **Laplace approximation alone** (rows ``laplace``):
   ``SVIConfig(guide=g, steps=1, min_steps=1, laplace_scale=1.0)`` for each stochastic
   guide, which stops SVI after a single Adam step (learning rate 0.01) from the MAP point
   with the full Laplace covariance (diagonal of it for ``normal``, rank-r + diagonal for
   ``lowrank``), which is where SVI starts; the table shows what the SVI steps add.
2. **Posterior predictive, batched vs per draw.** Noise-free stress of the specimens for 100
   draws of the ``mvn`` guide: :func:`bayescal.inference.draws.posterior_draws` (one
   batched solve of 100 x specimens) against a loop of 100 :meth:`Hierarchy.responses`
   calls of one draw each (one solve per draw). Each solve starts Newton from the
   predictor; the loop is also timed with the warm start on (``Solving(warm_start=True)``) (each draw's solve starts from the previous draw's trajectory). The two results
   are compared element-wise.
3. **The seed path.** pyzag's own route: a deterministic ``torch.nn.Module`` whose
   ``nn.Parameter``s are sy, Rinf, d, eta (scaled to [0, 1] over the card's bounds with
   ``pyzag.reparametrization.RangeRescale``, as pyzag's statistical tutorial does), mapping
   them to stress at the recorded points through :func:`bayescal.integrate.simulate` (same
   material model, same solver options, chunked adjoint), wrapped by
   ``pyzag.stochastic.HierarchicalStatisticalModel`` with ``MapNormal(cov)`` and a
   ``HalfNormal(10)`` noise prior, and fitted by Pyro's ``AutoDelta`` guide with
   ``SVI(..., ClippedAdam(lr), Trace_ELBO())``, starting at the card's prior centres (where
   bayescal's MAP starts). ``MapNormal`` gives every population location a
   ``Normal(start, cov * start)`` prior in the scaled space; ``cov = 0.35`` makes those
   priors about as wide as the card's priors on the population means. For each learning rate
   (``--seed-lrs``, default 0.005 as in pyzag's tutorial and 0.02), up to ``--seed-steps``
   steps (600): the wall time (setup + steps, not the bookkeeping) at which the population
   mean first reaches the error of bayescal's MAP (``delta`` row), and from which it stays
   within it to the end of the budget, both against the true means and against the sample
   means; the best and final errors; the ratios of those times to bayescal's MAP wall time.
   For bayescal's MAP the same times are read off its Newton iterates.

Torch runs on one thread (``--threads``): the tensors are small and the machine is shared.
Wall times on a loaded machine are noisy; CPU seconds (``time.process_time``) are printed
next to them, and the load average at start and end.

Usage::

    PYTHONPATH=. python benchmarks/svi.py            # 12 specimens, all guides (~1 h, 2 cores)
    PYTHONPATH=. python benchmarks/svi.py --quick    # 6 specimens, 10 points, delta + mvn
    PYTHONPATH=. python benchmarks/svi.py --resume   # only the stages missing from --out

Output: tables on stdout and ``benchmarks/results/svi.json`` (``--out``), a list of records,
written again after every stage:

* ``{"method": "svi" | "laplace", "guide", "wall_s", "cpu_s", "map_s", "svi_s",
  "map_iterations", "map_evaluations", "svi_steps", "s_per_step", "pop_mean_err_max",
  "pop_mean_err_vs_sample_max", "noise_err", "coverage90", "rel_width90", ...}``
  (``method`` is ``"svi"`` for the ``delta`` row too, the MAP-only fit);
* ``{"method": "predictive", "draws", "batched_s", "per_draw_s", "ratio", ...}``;
* ``{"method": "pyzag_autodelta", "lr", "steps", "wall_s", "time_to_map_err_s",
  "ratio_vs_map", ...}``.

Every record also holds the problem (``specimens``, ``points_per_segment``, ``data_seed``,
``fit_seed``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Self

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

import pyro
import torch
from pyro import poutine

import bayescal.inference.svi as svi_module
from bayescal.card import load_card
from bayescal.fit import package_versions
from bayescal.hierarchy import Hierarchy, Solving
from bayescal.inference.laplace import MAPConfig
from bayescal.inference.draws import posterior_draws, sample_guide
from bayescal.inference.svi import GUIDES, SVIConfig, run_svi
from bayescal.testing import CARD, NOISE, TRUE_MEANS, synthetic

DEFAULT_OUT = HERE / "results" / "svi.json"


# --------------------------------------------------------------------------- helpers


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self) -> Self:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


@contextmanager
def stage_timer():
    """Time the MAP (+ Laplace: the same Hessian) and SVI stages of ``run_svi`` by wrapping
    the module's stage functions (``run_svi`` looks them up in its module at call time)."""
    times = {"map_s": 0.0, "svi_s": 0.0}
    keys = {"fit_map": "map_s", "refine_guide": "svi_s"}
    originals = {name: getattr(svi_module, name) for name in keys}

    def wrap(name):
        function = originals[name]

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                times[keys[name]] += time.perf_counter() - start

        return timed

    for name in originals:
        setattr(svi_module, name, wrap(name))
    try:
        yield times
    finally:
        for name, function in originals.items():
            setattr(svi_module, name, function)


@contextmanager
def map_recorder():
    """Record every call of the log joint during ``run_svi`` (only the MAP stage calls it):
    ``(wall time at the call, rows, with gradient, first row)``. A call with gradient is a
    Newton iteration's gradient + Hessian batch, whose first row is the current iterate; one
    without is a line search."""
    calls = []
    original = svi_module.Packing.log_joint

    def log_joint(self, u, solving=None):
        calls.append((time.perf_counter(), u.shape[0], u.requires_grad, u.detach()[0].clone(),
                      self))
        return original(self, u, solving)

    svi_module.Packing.log_joint = log_joint
    try:
        yield calls
    finally:
        svi_module.Packing.log_joint = original


def map_trajectory(h: Hierarchy, points, start: float, truth, record: dict,
                   tolerance: float = 1e-3) -> dict:
    """Population-mean errors at the Newton iterates (wall time: when the iterate's gradient
    batch started), and the time at which they first get (and stay) within ``tolerance`` of
    the final MAP point's errors."""
    sample_means = {n: float(truth[n].double().mean()) for n in h.spec.varying}
    walls, errs, errs_sample = [], [], []
    for wall, _, _, u, packing in (c for c in points if c[2]):
        with torch.no_grad():
            values, _ = packing.constrain(u[None])
            population = h.population(values)
        means = {n: float(population[f"{n}_pop_mean"]) for n in h.spec.varying}
        walls.append(wall - start)
        errs.append(max(abs(means[n] / TRUE_MEANS[n] - 1) for n in means))
        errs_sample.append(max(abs(means[n] / sample_means[n] - 1) for n in means))
    out = {"map_err_tolerance": tolerance}
    for suffix, series, final in (("", errs, record["pop_mean_err_max"]),
                                  ("_vs_sample", errs_sample,
                                   record["pop_mean_err_vs_sample_max"])):
        first, stays = reach(series, final + tolerance)
        out[f"map_iterations_to_final_err{suffix}"] = first
        out[f"map_time_to_final_err{suffix}_s"] = first and walls[first - 1]
        out[f"map_iterations_to_stay_final_err{suffix}"] = stays
        out[f"map_time_to_stay_final_err{suffix}_s"] = stays and walls[stays - 1]
    out["map_history"] = [{"iteration": i + 1, "wall_s": walls[i], "pop_mean_err_max": errs[i],
                           "pop_mean_err_vs_sample_max": errs_sample[i]}
                          for i in range(len(walls))]
    return out


def specimen_values(h: Hierarchy, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Physical specimen values ``(draw, specimen)`` of the varying parameters for latent
    draws (the first half of :meth:`Hierarchy.responses`, without the solve)."""
    d = latents["noise_sd"].shape[0]
    n = h.experiments.n_specimens
    shaped = {k: v.reshape(d, 1) if v.dim() == 1 else v for k, v in latents.items()}
    with torch.no_grad(), pyro.plate("draws", d, dim=-2), poutine.condition(data=shaped):
        values = h.sample_parameters(pyro.plate("specimen", n, dim=-1))
    return {name: values[name].expand(d, n) for name in h.spec.varying}


def accuracy(h: Hierarchy, guide, truth: dict[str, torch.Tensor], draws: int,
             seed: int) -> dict:
    """Population-mean and noise errors, 90 % coverage and relative width from ``draws``
    posterior draws of ``guide``."""
    latents = sample_guide(h, guide, draws, seed)
    population = h.population(latents)
    values = specimen_values(h, latents)
    out = {"pop_mean_err": {}, "pop_mean_err_vs_sample": {}, "coverage90_by_param": {},
           "rel_width90_by_param": {}, "pop_mean": {}}
    inside, widths = [], []
    for name in h.spec.varying:
        true = truth[name].to(torch.float64)
        estimate = float(population[f"{name}_pop_mean"].mean())
        out["pop_mean"][name] = estimate
        out["pop_mean_err"][name] = abs(estimate / TRUE_MEANS[name] - 1)
        out["pop_mean_err_vs_sample"][name] = abs(estimate / float(true.mean()) - 1)
        lo, hi = torch.quantile(values[name], torch.tensor([0.05, 0.95], dtype=torch.float64),
                                dim=0)
        hit = (true >= lo) & (true <= hi)
        width = (hi - lo) / true
        inside.append(hit)
        widths.append(width)
        out["coverage90_by_param"][name] = float(hit.double().mean())
        out["rel_width90_by_param"][name] = float(width.mean())
    noise = float(latents["noise_sd"].mean())
    out.update(
        pop_mean_err_max=max(out["pop_mean_err"].values()),
        pop_mean_err_vs_sample_max=max(out["pop_mean_err_vs_sample"].values()),
        noise_sd=noise,
        noise_err=abs(noise / NOISE - 1),
        coverage90=float(torch.cat(inside).double().mean()),
        rel_width90=float(torch.cat(widths).mean()),
    )
    return out


def git_state() -> dict:
    """Commit of the checkout and a hash of uncommitted changes to bayescal/ and tests/."""
    import hashlib
    import subprocess

    def git(*cmd) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    diff = git("diff", "HEAD", "--", "bayescal", "tests")
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "uncommitted_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None}


def pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


# --------------------------------------------------------------------------- 1. guides


def run_guide(spec, experiments, truth, config: SVIConfig, method: str, args) -> dict:
    h = Hierarchy(spec, experiments)
    map_config = MAPConfig(iterations=args.map_iterations)
    with map_recorder() as points, stage_timer() as stages, Clock() as clock:
        start = time.perf_counter()
        result = run_svi(h, config, map_config, seed=args.fit_seed, progress=False)
    state = result.state
    record = {
        "method": method,
        "guide": config.guide,
        "wall_s": result.wall_time,
        "cpu_s": clock.cpu,
        **stages,
        "map_iterations": len(state.losses["map"]),
        "map_evaluations": sum(c[1] for c in points),
        "map_gradient_evaluations": sum(c[1] for c in points if c[2]),
        "map_line_search_points": sum(c[1] for c in points if not c[2]),
        "map_batched_solves": len(points),
        "svi_steps": state.step,
        "s_per_step": stages["svi_s"] / state.step if state.step else None,
        "skipped_steps": state.skipped,
        "solver_retries": state.retries,
        "final_loss": (state.losses["guide"] or state.losses["map"] or [None])[-1],
        "map_losses": list(state.losses["map"]),
        "map_budget_exhausted": len(state.losses["map"]) >= map_config.iterations,
        "config": asdict(config),
    }
    record.update(accuracy(h, result.guide, truth, args.draws, args.fit_seed))
    if config.guide == "delta":
        record.update(map_trajectory(h, points, start, truth, record))
    return record, h, result


# --------------------------------------------------------------------------- 2. predictive


def predictive_comparison(spec, experiments, guide_h, guide, args) -> dict:
    n = args.predictive_draws
    latents = sample_guide(guide_h, guide, n, args.fit_seed + 1)
    h = Hierarchy(spec, experiments)

    def one(i: int) -> dict[str, torch.Tensor]:
        return {k: v[i:i + 1] for k, v in latents.items()}

    h.responses(one(0))  # warm-up (first-call overheads)
    with Clock() as batched:
        post = posterior_draws(h, latents)
    stresses = []
    with Clock() as loop:
        for i in range(n):
            stresses.append(h.responses(one(i))[1])
    looped = torch.cat(stresses)
    warm = Solving(strict=False, warm_start=True)
    h.responses(one(0), warm)
    with Clock() as loop_warm:
        for i in range(n):
            h.responses(one(i), warm)
    diff = float((post.stress_mean - looped).abs().max())
    return {
        "method": "predictive",
        "guide": "mvn",
        "draws": n,
        "specimen_solves": n * experiments.n_specimens,
        "batched_s": batched.wall,
        "batched_cpu_s": batched.cpu,
        "per_draw_s": loop.wall,
        "per_draw_cpu_s": loop.cpu,
        "per_draw_warm_start_s": loop_warm.wall,
        "ratio": loop.wall / batched.wall,
        "ratio_warm_start": loop_warm.wall / batched.wall,
        "max_abs_diff_mpa": diff,
        "failed_draws": post.failed_draws,
    }


# --------------------------------------------------------------------------- 3. seed path


def seed_path(spec, experiments, truth, map_record: dict, lr: float, args) -> dict:
    """pyzag HierarchicalStatisticalModel + AutoDelta + ClippedAdam on the same data."""
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoDelta
    from pyzag.reparametrization import RangeRescale, Reparameterizer
    from pyzag.stochastic import HierarchicalStatisticalModel, MapNormal

    from bayescal.material import get_model
    from bayescal.integrate import simulate

    names = list(spec.varying)
    dtype = torch.float64

    class StressAtRecorded(torch.nn.Module):
        """Deterministic: parameters (``nn.Parameter``) -> stress at the recorded points."""

        def __init__(self) -> None:
            super().__init__()
            self.material = get_model(spec.model)
            self.options = spec.solver
            self.fixed = {k: float(p.value) for k, p in spec.parameters.items() if p.is_fixed}
            # In a child module: pyzag's Reparameterizer cannot rescale parameters of the root
            # module (it looks them up as ".parametrizations.<name>.original").
            self.p = torch.nn.Module()
            for name in names:
                setattr(self.p, name, torch.nn.Parameter(
                    torch.tensor(spec.parameters[name].prior[0], dtype=dtype)))
            self.failed = 0

        def forward(self, time_, strain):  # (n_rec, batch, 1) each
            params = dict(self.fixed)
            params.update({name: getattr(self.p, name) for name in names})
            stress, report = simulate(self.material, params, time_[..., 0], strain[..., 0],
                                      self.options, adjoint=True)
            self.failed += report.n_failed
            return stress[..., None]

    scalers = {name: RangeRescale(torch.tensor(spec.parameters[name].bounds[0], dtype=dtype),
                                  torch.tensor(spec.parameters[name].bounds[1], dtype=dtype))
               for name in names}
    time3 = experiments.time[..., None].to(dtype)
    strain3 = experiments.strain[..., None].to(dtype)
    observed = experiments.stress[..., None].to(dtype)
    weights = torch.ones(experiments.n_specimens, dtype=dtype)
    sample_means = {name: float(truth[name].double().mean()) for name in names}

    def errors(guide) -> tuple[float, float, dict]:
        point = guide.median(time3, strain3, results=observed, weights=weights)
        means = {name: float(scalers[name](point[f"p.parametrizations.{name}.original_loc"]))
                 for name in names}
        err = max(abs(means[n] / TRUE_MEANS[n] - 1) for n in names)
        err_sample = max(abs(means[n] / sample_means[n] - 1) for n in names)
        return err, err_sample, {**means, "noise_sd": float(point["eps"])}

    pyro.clear_param_store()
    pyro.set_rng_seed(args.fit_seed)
    with Clock() as setup:
        base = StressAtRecorded()
        Reparameterizer({f"p.{name}": scalers[name] for name in names},
                        error_not_provided=True)(base)
        model = HierarchicalStatisticalModel(base, MapNormal(args.seed_cov),
                                             torch.tensor(spec.noise_prior_scale, dtype=dtype))
        guide = AutoDelta(model)
        svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": lr}), Trace_ELBO())
    elapsed, cpu = setup.wall, setup.cpu
    trace = {"wall_s": [], "loss": [], "err": [], "err_sample": [], "noise": []}
    steps, diverged = 0, None
    for step in range(1, args.seed_steps + 1):
        with Clock() as tick:
            loss = svi.step(time3, strain3, results=observed, weights=weights)
        elapsed += tick.wall
        cpu += tick.cpu
        steps = step
        if not math.isfinite(loss):
            diverged = step
            break
        err, err_sample, means = errors(guide)
        for key, value in zip(trace, (elapsed, loss, err, err_sample, means["noise_sd"])):
            trace[key].append(value)
        if args.verbose and step % 50 == 0:
            print(f"    seed lr={lr:g} step {step}: {elapsed:.1f} s, loss {loss:.6g}, "
                  f"err {100 * err:.2f} %, vs sample {100 * err_sample:.2f} %, "
                  f"noise {means['noise_sd']:.3f}", flush=True)
    final_means = errors(guide)[2] if diverged is None and steps else {}
    map_wall = map_record["wall_s"]
    record = {
        "method": "pyzag_autodelta",
        "guide": "AutoDelta",
        "lr": lr,
        "cov": args.seed_cov,
        "steps": steps,
        "budget_steps": args.seed_steps,
        "diverged_at_step": diverged,
        "wall_s": elapsed,
        "cpu_s": cpu,
        "setup_s": setup.wall,
        "s_per_step": (elapsed - setup.wall) / steps,
        "solver_failures": base.failed,
        "map_wall_s": map_wall,
        "final_values": final_means,
    }
    noise_target = max(0.1, map_record["noise_err"])
    noise_err = [abs(x / NOISE - 1) for x in trace["noise"]]
    for suffix, errs, target in (("", trace["err"], map_record["pop_mean_err_max"]),
                                 ("_vs_sample", trace["err_sample"],
                                  map_record["pop_mean_err_vs_sample_max"])):
        first, stays = reach(errs, target)
        record[f"target_pop_mean_err{suffix}_max"] = target
        record[f"steps_to_map_err{suffix}"] = first
        record[f"time_to_map_err{suffix}_s"] = first and trace["wall_s"][first - 1]
        record[f"ratio_vs_map{suffix}"] = first and trace["wall_s"][first - 1] / map_wall
        record[f"steps_to_stay_within_map_err{suffix}"] = stays
        record[f"time_to_stay_within_map_err{suffix}_s"] = stays and trace["wall_s"][stays - 1]
        record[f"ratio_stay_vs_map{suffix}"] = stays and trace["wall_s"][stays - 1] / map_wall
        record[f"best_pop_mean_err{suffix}_max"] = min(errs, default=math.nan)
        record[f"pop_mean_err{suffix}_max"] = errs[-1] if errs and diverged is None else math.nan
    first, stays = reach(noise_err, noise_target)
    record.update(
        noise_err=noise_err[-1] if noise_err and diverged is None else math.nan,
        noise_target=noise_target,
        steps_to_noise_target=first,
        time_to_noise_target_s=first and trace["wall_s"][first - 1],
        history=[{"step": i + 1, "wall_s": trace["wall_s"][i], "loss": trace["loss"][i],
                  "pop_mean_err_max": trace["err"][i],
                  "pop_mean_err_vs_sample_max": trace["err_sample"][i],
                  "noise_sd": trace["noise"][i]}
                 for i in range(len(trace["err"])) if i == 0 or (i + 1) % 25 == 0],
    )
    return record


def reach(errors: list[float], target: float) -> tuple[int | None, int | None]:
    """First step (1-based) with ``error <= target``, and the first step from which every
    later error stays within it (None if never)."""
    first = next((i + 1 for i, e in enumerate(errors) if e <= target), None)
    above = [i for i, e in enumerate(errors) if e > target]
    stays = (above[-1] + 2 if above else 1) if errors and errors[-1] <= target else None
    return first, stays


# --------------------------------------------------------------------------- tables


def guide_table(records) -> None:
    head = (f"{'method':<9} {'guide':<8} {'wall_s':>8} {'cpu_s':>8} {'map_s':>6} {'map_it':>6} "
            f"{'map_pts':>7} {'steps':>5} "
            f"{'s/step':>7} {'popErr%':>7} {'vsSmp%':>7} {'noise%':>7} {'cov90':>6} "
            f"{'relW90':>7}")
    print(head)
    print("-" * len(head))
    for r in records:
        sps = "-" if r["s_per_step"] is None else f"{r['s_per_step']:.3f}"
        print(f"{r['method']:<9} {r['guide']:<8} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} "
              f"{r['map_s']:>6.1f} {r['map_iterations']:>6} {r['map_evaluations']:>7} "
              f"{r['svi_steps']:>5} {sps:>7} "
              f"{pct(r['pop_mean_err_max']):>7} {pct(r['pop_mean_err_vs_sample_max']):>7} "
              f"{pct(r['noise_err']):>7} {r['coverage90']:>6.3f} {r['rel_width90']:>7.4f}")


def coverage_table(records) -> None:
    names = list(records[0]["coverage90_by_param"])
    print(f"{'method':<9} {'guide':<8} " + " ".join(f"{n + ' cov/w':>15}" for n in names))
    for r in records:
        cells = [f"{r['coverage90_by_param'][n]:.2f}/{r['rel_width90_by_param'][n]:.3f}"
                 for n in names]
        print(f"{r['method']:<9} {r['guide']:<8} " + " ".join(f"{c:>15}" for c in cells))


def seed_table(records, map_record) -> None:
    """Times (s) to the MAP's population-mean error: first reached / reached for good."""

    def fmt(x, f=".1f") -> str:
        return "never" if x is None else format(x, f)

    head = (f"{'method':<16} {'lr':>6} {'steps':>5} {'wall_s':>7} {'s/it':>6} "
            f"{'true:1st':>8} {'stay':>6} {'smp:1st':>8} {'stay':>6} {'best%':>6} "
            f"{'bestSmp%':>8} {'final%':>6} {'finSmp%':>7} {'noise%':>7}")
    print(head)
    print("-" * len(head))
    m = map_record
    print(f"{'bayescal MAP':<16} {'-':>6} {m['map_iterations']:>5} {m['wall_s']:>7.1f} "
          f"{m['map_s'] / m['map_iterations']:>6.2f} "
          f"{fmt(m.get('map_time_to_final_err_s')):>8} "
          f"{fmt(m.get('map_time_to_stay_final_err_s')):>6} "
          f"{fmt(m.get('map_time_to_final_err_vs_sample_s')):>8} "
          f"{fmt(m.get('map_time_to_stay_final_err_vs_sample_s')):>6} "
          f"{pct(m['pop_mean_err_max']):>6} {pct(m['pop_mean_err_vs_sample_max']):>8} "
          f"{pct(m['pop_mean_err_max']):>6} {pct(m['pop_mean_err_vs_sample_max']):>7} "
          f"{pct(m['noise_err']):>7}")
    for r in records:
        print(f"{'pyzag AutoDelta':<16} {r['lr']:>6g} {r['steps']:>5} {r['wall_s']:>7.1f} "
              f"{r['s_per_step']:>6.3f} {fmt(r['time_to_map_err_s']):>8} "
              f"{fmt(r['time_to_stay_within_map_err_s']):>6} "
              f"{fmt(r['time_to_map_err_vs_sample_s']):>8} "
              f"{fmt(r['time_to_stay_within_map_err_vs_sample_s']):>6} "
              f"{pct(r['best_pop_mean_err_max']):>6} "
              f"{pct(r['best_pop_mean_err_vs_sample_max']):>8} "
              f"{pct(r['pop_mean_err_max']):>6} {pct(r['pop_mean_err_vs_sample_max']):>7} "
              f"{pct(r['noise_err']):>7}")
    print("\n(bayescal MAP: 'steps' = Newton iterations, times = when an iterate first comes "
          "within 0.1 %-point of the final errors; 'stay' = and stays; seed times include setup)")
    for r in records:
        parts = []
        for label, key in (("first reach vs true", "ratio_vs_map"),
                           ("stay vs true", "ratio_stay_vs_map"),
                           ("first reach vs sample", "ratio_vs_map_vs_sample"),
                           ("stay vs sample", "ratio_stay_vs_map_vs_sample")):
            parts.append(f"{label} {fmt(r[key], '.2f')}")
        noise = (f"noise within {100 * r['noise_target']:.0f} % after "
                 f"{fmt(r['time_to_noise_target_s'])} s")
        print(f"lr {r['lr']:g}: seed time / bayescal MAP wall ({m['wall_s']:.1f} s): "
              + ", ".join(parts) + f"; {noise}")


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--specimens", type=int, default=None, help="default 12 (quick: 6)")
    parser.add_argument("--points", type=int, default=None,
                        help="recorded points per segment, default 30 (quick: 10)")
    parser.add_argument("--quick", action="store_true",
                        help="6 specimens, 10 points per segment, guides delta and mvn")
    parser.add_argument("--guides", default=None, help="comma-separated subset of guides")
    parser.add_argument("--data-seed", type=int, default=11)
    parser.add_argument("--fit-seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=400, help="posterior draws for coverage")
    parser.add_argument("--predictive-draws", type=int, default=100)
    parser.add_argument("--seed-steps", type=int, default=600, help="budget of the seed path")
    parser.add_argument("--seed-lrs", default="0.005,0.02", help="Adam rates of the seed path")
    parser.add_argument("--seed-cov", type=float, default=0.35, help="MapNormal cov")
    parser.add_argument("--skip", default="",
                        help="comma-separated: laplace,predictive,seed")
    parser.add_argument("--map-iterations", type=int, default=MAPConfig.iterations,
                        help="Newton iterations of the MAP stage (SVIConfig default)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="keep the records already in --out (same problem) and run only "
                             "the stages that have none")
    args = parser.parse_args(argv)
    args.specimens = args.specimens or (6 if args.quick else 12)
    args.points = args.points or (10 if args.quick else 30)
    guides = (args.guides.split(",") if args.guides
              else ["delta", "mvn"] if args.quick else list(GUIDES))
    skip = set(filter(None, args.skip.split(",")))

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = load_card(ROOT / CARD)
    experiments, truth = synthetic(args.specimens, seed=args.data_seed,
                                   points_per_segment=args.points)
    problem = {"specimens": args.specimens, "points_per_segment": args.points,
               "recorded_points": experiments.n_steps, "data_seed": args.data_seed,
               "fit_seed": args.fit_seed, "threads": args.threads, **git_state()}
    print(f"load average at start: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()}); "
          f"{package_versions()}")
    print(f"code: commit {problem['commit']}, uncommitted bayescal/tests change "
          f"{problem['uncommitted_sha1']}")
    print(f"problem: {args.specimens} specimens, {args.points} points per segment "
          f"({experiments.n_steps} recorded points), data seed {args.data_seed}, "
          f"fit seed {args.fit_seed}, torch threads {args.threads}", flush=True)
    print("true population means " + ", ".join(f"{k}={v:g}" for k, v in TRUE_MEANS.items())
          + "; sample means " + ", ".join(f"{k}={float(v.double().mean()):.2f}"
                                          for k, v in truth.items()), flush=True)

    records: list[dict] = []
    if args.resume and args.out.exists():
        records = [r for r in json.loads(args.out.read_text())
                   if all(r.get(k) == v for k, v in problem.items() if k != "threads")]
        if len(records) == 0:
            print("no records of this problem and code state to resume from", flush=True)
        print(f"resuming: {len(records)} records from {args.out}", flush=True)

    def have(method: str, guide: str) -> bool:
        return any(r["method"] == method and r.get("guide") == guide for r in records)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([{**problem, **r} for r in records], indent=1) + "\n")

    fits = {}
    for guide in guides:
        if have("svi", guide):
            continue
        print(f"  fitting guide {guide} ...", flush=True)
        config = SVIConfig(guide=guide)
        record, h, result = run_guide(spec, experiments, truth, config, "svi", args)
        fits[guide] = (h, result)
        records.append(record)
        save()
        print(f"    {record['wall_s']:.1f} s, {record['map_iterations']} Newton iterations "
              f"({record['map_evaluations']} points), "
              f"{record['svi_steps']} SVI steps, coverage {record['coverage90']:.3f}", flush=True)
    # The Laplace approximation alone: the guide at the MAP with the full Laplace covariance
    # (the guides' starting point), stopped after one SVI step.
    for guide in guides:
        if guide == "delta" or "laplace" in skip or have("laplace", guide):
            continue
        print(f"  laplace, guide {guide} ...", flush=True)
        config = SVIConfig(guide=guide, steps=1, min_steps=1, laplace_scale=1.0)
        record, _, _ = run_guide(spec, experiments, truth, config, "laplace", args)
        records.append(record)
        save()
        print(f"    {record['wall_s']:.1f} s, coverage {record['coverage90']:.3f}", flush=True)
    guide_records = [r for r in records if r["method"] in ("svi", "laplace")]
    print("\n== 1. guides (errors in %, coverage of 90 % intervals of the specimen truths)\n")
    guide_table(guide_records)
    print("\nper parameter: coverage90 / mean relative width90\n")
    coverage_table(guide_records)

    if "predictive" not in skip and "mvn" in fits and not have("predictive", "mvn"):
        print("\n  posterior predictive, batched vs per draw (draws of mvn) ...", flush=True)
        h, result = fits["mvn"]
        record = predictive_comparison(spec, experiments, h, result.guide, args)
        records.append(record)
        save()
    record = next((r for r in records if r["method"] == "predictive"), None)
    if record is not None:
        print(f"\n== 2. posterior predictive: noise-free stress, {record['draws']} draws "
              f"({record['guide']} guide) x {args.specimens} specimens "
              f"({record['specimen_solves']} specimen solves)\n")
        print(f"{'method':<34} {'wall_s':>8} {'cpu_s':>8}")
        print(f"{'posterior_draws (one batched)':<34} {record['batched_s']:>8.2f} "
              f"{record['batched_cpu_s']:>8.2f}")
        print(f"{'loop of predict (one per draw)':<34} {record['per_draw_s']:>8.2f} "
              f"{record['per_draw_cpu_s']:>8.2f}")
        print(f"{'  same loop, warm start on':<34} {record['per_draw_warm_start_s']:>8.2f}")
        print(f"ratio per-draw / batched: {record['ratio']:.1f}x "
              f"(warm-started loop: {record['ratio_warm_start']:.1f}x); "
              f"max |difference| {record['max_abs_diff_mpa']:.2e} MPa")

    map_record = next((r for r in records if r["method"] == "svi" and r["guide"] == "delta"),
                      None)
    if "seed" not in skip and map_record is not None:
        seeds = [r for r in records if r["method"] == "pyzag_autodelta"]
        done = {r["lr"] for r in seeds}
        for lr in (float(x) for x in args.seed_lrs.split(",") if float(x) not in done):
            print(f"\n  seed path: pyzag HierarchicalStatisticalModel + AutoDelta, lr {lr:g} ...",
                  flush=True)
            record = seed_path(spec, experiments, truth, map_record, lr, args)
            records.append(record)
            seeds.append(record)
            save()
        print(f"\n== 3. seed path vs bayescal MAP (target: MAP's max population-mean error "
              f"{pct(map_record['pop_mean_err_max'])} % vs true, "
              f"{pct(map_record['pop_mean_err_vs_sample_max'])} % vs sample means; "
              f"budget {args.seed_steps} steps)\n")
        seed_table(seeds, map_record)

    print(f"\nload average at end: {os.getloadavg()[0]:.2f}; "
          f"total {time.perf_counter() - started:.0f} s")
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
