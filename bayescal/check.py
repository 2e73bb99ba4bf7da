"""Model verification: library functions that return numbers, no printing.

:func:`check_model` runs four checks of a model card on a load path (by default the
:func:`informative_path`), each a :class:`CheckResult`:

``jacobian``
    the analytic block Jacobian of the backward Euler residual against autograd, at the
    states of a solved trajectory (largest entry error relative to the largest entry of its
    row of the block, over all blocks);
``adjoint-gradient``
    pyzag's chunked adjoint gradient of a scalar loss (a weighted sum of stress at the
    recorded points) with respect to every calibrated parameter, against central finite
    differences (largest relative error over the parameters);
``chunking``
    the card's ``n_chunk`` against a sequential solve (``n_chunk = 1``): largest stress
    difference relative to the largest stress;
``integration``
    the card's grid (planned from its tolerance, or its fixed sub-steps) against a grid
    :data:`FINER` times finer, at the recorded points: rms and largest difference in MPa,
    and the observed order of convergence from the grid doubled and doubled again;
``response``
    the stress is not zero everywhere, and (built-in models) some step is inelastic: a card
    whose load never reaches yield, or a tolerance so loose that Newton accepts its first
    guess, tells the fit nothing.

Parameters are the prior centres of the calibrated parameters and the values of the fixed
ones (:func:`check_parameters`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch

from bayescal.card import ModelSpec, load_model
from bayescal.data import Experiments
from bayescal.errors import BadInput
from bayescal.material import Integrable, MaterialModel
from bayescal.integrate import (SolverOptions, broadcast_params, fixed_substeps, integrate,
                               plan_substeps, refine, simulate, solve_recorded)

#: Pass thresholds of the checks, by check name (module level so that tests can tighten them).
TOLERANCES: dict[str, float] = {
    "jacobian": 1e-6,            # relative
    "adjoint-gradient": 1e-5,    # relative
    "chunking": 1e-6,            # relative to the largest stress
    "integration": 0.2,          # MPa, rms at the recorded points
    "response": 0.99,            # share of elastic steps: fewer than 1 % inelastic inform little
}
#: Newton tolerances of the solves of the adjoint-gradient check.
GRADIENT_TOLERANCE = 1e-11
#: Relative step of the central finite differences.
FD_STEP = 1e-6
#: Refinement factor of the reference grid of the integration check.
FINER = 4

#: The informative load path: (duration s, end strain) of each segment, from zero strain:
#: 1e-3/s to 1.5 %, 1e-1/s to 3 %, hold 50 s, unload at -1e-2/s to 2.7 %, reload at 1e-2/s
#: to 4.5 %.
INFORMATIVE_SEGMENTS: tuple[tuple[float, float], ...] = (
    (15.0, 0.015),
    (0.15, 0.03),
    (50.0, 0.03),
    (0.3, 0.027),
    (1.8, 0.045),
)


@dataclass(frozen=True)
class CheckResult:
    """One check: its ``value`` passes when it is at most ``tolerance``."""

    name: str
    value: float
    tolerance: float
    passed: bool
    detail: str


def piecewise_path(segments, points_per_segment: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """A strain-controlled path from zero through ``segments`` of ``(duration_s, end_strain)``,
    strain linear in time within each, ``points_per_segment`` recorded intervals per segment.
    Returns ``time``, ``strain`` of shape ``(n,)`` (float64)."""
    if points_per_segment < 1:
        raise BadInput(f"points_per_segment must be at least 1, got {points_per_segment}")
    times, strains = [torch.zeros(1, dtype=torch.float64)], [torch.zeros(1, dtype=torch.float64)]
    t0, e0 = 0.0, 0.0
    u = torch.linspace(0.0, 1.0, points_per_segment + 1, dtype=torch.float64)[1:]
    for duration, e1 in segments:
        times.append(t0 + u * duration)
        strains.append(e0 + u * (e1 - e0))
        t0, e0 = t0 + duration, e1
    return torch.cat(times), torch.cat(strains)


def informative_path(points_per_segment: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """The informative load path: two strain rates, a relaxation hold, an unload and a
    reload (:data:`INFORMATIVE_SEGMENTS`)."""
    return piecewise_path(INFORMATIVE_SEGMENTS, points_per_segment)


def check_parameters(spec: ModelSpec) -> dict[str, float]:
    """The parameters the checks run at: prior centres, or the value of a fixed parameter."""
    return {name: (p.value if p.is_fixed else p.prior[0]) for name, p in spec.parameters.items()}


@dataclass(frozen=True)
class CheckLoad:
    """The recorded paths of the checks on the compute device: ``time``, ``strain``, ``mask``
    (and ``temperature`` if the load has it) of shape ``(n_rec, batch)`` (``mask`` False where
    a shorter path is padded)."""

    time: torch.Tensor
    strain: torch.Tensor
    mask: torch.Tensor
    temperature: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.time.shape[1]


def check_load(load: Experiments | None = None, device: str | torch.device = "cpu") -> CheckLoad:
    """``load``'s paths (default: :func:`informative_path`) as a :class:`CheckLoad`."""
    temperature = None
    if load is None:
        time, strain = informative_path()
        time, strain = time[:, None], strain[:, None]
        mask = torch.ones_like(time, dtype=torch.bool)
    else:
        time, strain, mask = load.time, load.strain, load.mask
        if load.temperature is not None:
            temperature = load.temperature.to(device, torch.float64)
    return CheckLoad(time.to(device, torch.float64), strain.to(device, torch.float64),
                     mask.to(device), temperature)


def _tensors(params: Mapping[str, float], like: torch.Tensor,
             grad: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=like.dtype, device=like.device,
                               requires_grad=name in grad)
            for name, value in params.items()}


def _failed(name: str, report, tolerance: float, what: str) -> CheckResult:
    return CheckResult(name, float("nan"), tolerance, False,
                       f"the solver failed ({what}) for path(s) {report.failed_indices()}")


# ------------------------------------------------------------------------------- the checks


def check_jacobian(model: Integrable, params: Mapping[str, float], load: CheckLoad,
                   options: SolverOptions) -> CheckResult:
    """Analytic residual Jacobian against autograd at the states of a solved trajectory."""
    name, tol = "jacobian", TOLERANCES["jacobian"]
    grid = refine(load.time, load.strain, card_substeps(model, params, load, options),
                  load.temperature)
    states, report = integrate(model, _tensors(params, load.time), grid, options, adjoint=False,
                               stages=True)
    if report.n_failed:
        return _failed(name, report, tol, "trajectory")
    steps, batch, n = states.shape[0] - 1, states.shape[1], states.shape[2]
    # every step is its own one-step problem, so d R / d x_new and d R / d x_prev separate
    x_prev = states[:-1].reshape(1, steps * batch, n).detach().requires_grad_()
    x_new = states[1:].reshape(1, steps * batch, n).detach().requires_grad_()
    pair = lambda x: None if x is None else torch.stack([x[:-1], x[1:]]).reshape(  # noqa: E731
        2, steps * batch)
    p = broadcast_params(model, _tensors(params, load.time), batch, load.time)
    factory = model.factory({k: v.repeat(steps) for k, v in p.items()}, options.scheme)
    forces = model.forces(pair(grid.time), pair(grid.strain), pair(grid.temperature))
    R, J = factory.evaluate_raw(torch.cat([x_prev, x_new]), forces)
    diag, sub = model.dense_jacobian(J)
    auto_diag = torch.empty_like(diag)
    auto_sub = torch.empty_like(diag)
    for i in range(n):
        g_prev, g_new = torch.autograd.grad(R[..., i].sum(), (x_prev, x_new), retain_graph=True)
        auto_diag[..., i, :] = g_new
        auto_sub[..., i, :] = g_prev
    errors = []
    for analytic, auto in ((diag, auto_diag), (sub, auto_sub)):
        scale = auto.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(auto.dtype).tiny)
        errors.append(((analytic.detach() - auto).abs() / scale).amax())
    value = float(torch.stack(errors).max())
    detail = f"{steps} steps x {batch} path(s)"
    if isinstance(model, MaterialModel):  # an elastic step's diagonal block is the identity
        eye = torch.eye(n, dtype=diag.dtype, device=diag.device)
        inelastic = int(((diag.detach() - eye).abs().amax(dim=(-2, -1)) > 0).sum())
        detail += f", {inelastic} of {steps * batch} diagonal blocks inelastic"
    detail += "; error relative to the largest entry of each block row"
    return CheckResult(name, value, tol, value <= tol, detail)


def _weights(load: CheckLoad) -> torch.Tensor:
    """Loss weights at the recorded points (zero where padded)."""
    w = torch.linspace(0.5, 1.5, load.time.shape[0], dtype=load.time.dtype, device=load.time.device)
    return w[:, None] * load.mask


def card_substeps(model: Integrable, params: Mapping[str, float], load: CheckLoad,
                  options: SolverOptions):
    """The card's integration steps per recorded interval on ``load``: planned from its
    tolerance at ``params`` (:func:`~bayescal.integrate.plan_substeps`), or fixed."""
    if not options.automatic:
        return fixed_substeps(load.time, load.strain, options)
    return plan_substeps(model, params, load.time, load.strain, options, load.temperature,
                         load.mask).substeps


def check_adjoint(model: Integrable, params: Mapping[str, float], calibrated: Sequence[str],
                  load: CheckLoad, options: SolverOptions) -> CheckResult:
    """Adjoint gradient of ``sum(w * stress)`` against central finite differences (every
    solve on the same grid, planned once at ``params``)."""
    name, tol = "adjoint-gradient", TOLERANCES["adjoint-gradient"]
    if not calibrated:
        return CheckResult(name, 0.0, tol, True, "no calibrated parameters: nothing to check")
    substeps = card_substeps(model, params, load, options)
    tight = replace(options, rtol=GRADIENT_TOLERANCE, atol=GRADIENT_TOLERANCE)
    w = _weights(load)
    p = _tensors(params, load.time, grad=calibrated)
    stress, report = simulate(model, p, load.time, load.strain, tight,
                              temperature=load.temperature, substeps=substeps)
    if report.n_failed:
        return _failed(name, report, tol, "adjoint solve")
    loss = (w * torch.where(load.mask, stress, 0.0)).sum()
    loss.backward()
    adjoint = torch.stack([p[k].grad for k in calibrated]).detach()

    # finite differences: every perturbation is a block of paths in one batched solve, in the
    # order +h, -h, +2h, -2h for each parameter, then the unperturbed parameters
    offsets = (1.0, -1.0, 2.0, -2.0)
    n_pert, batch = len(offsets) * len(calibrated) + 1, load.batch
    perturbed = {k: torch.full((n_pert, batch), float(v), dtype=load.time.dtype,
                               device=load.time.device) for k, v in params.items()}
    h = torch.tensor([FD_STEP * (abs(params[k]) or 1.0) for k in calibrated],
                     dtype=load.time.dtype, device=load.time.device)
    for i, k in enumerate(calibrated):
        for j, a in enumerate(offsets):
            perturbed[k][len(offsets) * i + j] += a * float(h[i])
    stress, report = simulate(model, {k: v.reshape(-1) for k, v in perturbed.items()},
                              load.time.repeat(1, n_pert), load.strain.repeat(1, n_pert), tight,
                              adjoint=False, temperature=None if load.temperature is None
                              else load.temperature.repeat(1, n_pert), substeps=substeps)
    if report.n_failed:
        return _failed(name, report, tol, "finite-difference solves")
    losses = (w.repeat(1, n_pert) * torch.where(load.mask.repeat(1, n_pert), stress, 0.0))
    losses = losses.reshape(-1, n_pert, batch).sum(dim=(0, 2))
    base, f = losses[-1], losses[:-1].reshape(len(calibrated), len(offsets))
    central = (f[:, 0] - f[:, 1]) / (2 * h)
    # second-order one-sided differences, for a loss with a kink at (or within 2h of) the point
    right = (-3 * base + 4 * f[:, 0] - f[:, 2]) / (2 * h)
    left = (3 * base - 4 * f[:, 1] + f[:, 3]) / (2 * h)
    # a parameter that the loss does not depend on is compared on the scale of the loss
    floor = 1e-12 * float(loss.detach().abs()) / torch.tensor(
        [abs(params[k]) or 1.0 for k in calibrated], dtype=h.dtype, device=h.device)
    scale = torch.maximum(adjoint.abs(), floor)
    rel = (central - adjoint).abs() / scale
    kink = (right - left).abs() / scale > tol
    one_sided = torch.minimum((right - adjoint).abs(), (left - adjoint).abs()) / scale
    rel = torch.where(kink, one_sided, rel)
    value = float(rel.max())
    per = ", ".join(f"{k} {float(r):.1e}" + (" (kink: one-sided)" if bool(c) else "")
                    for k, r, c in zip(calibrated, rel, kink, strict=True))
    detail = (f"relative error by parameter: {per}; central differences, step {FD_STEP:g} "
              f"relative, solves at rtol = atol = {GRADIENT_TOLERANCE:g}")
    return CheckResult(name, value, tol, value <= tol, detail)


def check_chunking(model: Integrable, params: Mapping[str, float], load: CheckLoad,
                   options: SolverOptions) -> CheckResult:
    """Stress with the card's ``n_chunk`` (or the automatic one for the check's paths)
    against a sequential solve."""
    name, tol = "chunking", TOLERANCES["chunking"]
    options = options.for_batch(load.time.shape[1])
    p = _tensors(params, load.time)
    substeps = card_substeps(model, params, load, options)
    chunked, report = simulate(model, p, load.time, load.strain, options, adjoint=False,
                               temperature=load.temperature, substeps=substeps)
    if report.n_failed:
        return _failed(name, report, tol, f"n_chunk = {options.n_chunk}")
    sequential, report = simulate(model, p, load.time, load.strain,
                                  replace(options, n_chunk=1), adjoint=False,
                                  temperature=load.temperature, substeps=substeps)
    if report.n_failed:
        return _failed(name, report, tol, "n_chunk = 1")
    diff = float((chunked - sequential).abs()[load.mask].max())
    peak = float(sequential.abs()[load.mask].max())
    value = diff / peak if peak > 0 else diff
    detail = (f"n_chunk = {options.n_chunk} vs 1: max |difference| {diff:.3g} MPa, "
              f"max |stress| {peak:.4g} MPa")
    return CheckResult(name, value, tol, value <= tol, detail)


def check_integration(model: Integrable, params: Mapping[str, float], load: CheckLoad,
                      options: SolverOptions) -> CheckResult:
    """The card's grid against one :data:`FINER` times finer, at the recorded points, and
    the observed order of convergence ``log2(|s(m) - s(2m)| / |s(2m) - s(4m)|)`` (rms
    differences) from the card's steps ``m``."""
    name, tol = "integration", TOLERANCES["integration"]
    p = _tensors(params, load.time)
    substeps = card_substeps(model, params, load, options)
    stress = {}
    for factor in (1, 2, 4, FINER):
        stress[factor], report = simulate(model, p, load.time, load.strain, options,
                                          adjoint=False, temperature=load.temperature,
                                          substeps=factor * substeps)
        if report.n_failed:
            return _failed(name, report, tol, f"{factor} x the card's steps")
    rms = lambda a, b: float((stress[a] - stress[b])[load.mask].square().mean().sqrt())  # noqa: E731
    diff = (stress[1] - stress[FINER])[load.mask]
    value, worst = rms(1, FINER), float(diff.abs().max())
    coarse, fine = rms(1, 2), rms(2, 4)
    order = math.log2(coarse / fine) if fine > 0 and coarse > 0 else float("nan")
    how = (f"tolerance {options.tolerance:g} MPa" if options.automatic else
           f"substeps {options.substeps}/{options.transient_substeps or 4 * options.substeps}")
    detail = (f"rms {value:.3g} MPa, max {worst:.3g} MPa at {diff.numel()} recorded points "
              f"against a grid {FINER}x finer; {options.scheme}, {int(substeps.sum())} steps "
              f"({how}); observed order {order:.2f}")
    return CheckResult(name, value, tol, value <= tol, detail)


def check_response(model: Integrable, params: Mapping[str, float], load: CheckLoad,
                   options: SolverOptions) -> CheckResult:
    """Fails when the stress is zero everywhere or (built-in models) hardly any step is
    inelastic: ``value`` is the share of elastic steps (1 when the stress is zero
    everywhere)."""
    name = "response"
    substeps = card_substeps(model, params, load, options)
    grid = refine(load.time, load.strain, substeps, load.temperature)
    at_points, states, report = solve_recorded(model, _tensors(params, load.time), grid,
                                               options, adjoint=False)
    if report.n_failed:
        return _failed(name, report, TOLERANCES[name], "trajectory")
    stress = model.stress(at_points)[load.mask]
    peak = float(stress.abs().max()) if stress.numel() else 0.0
    if peak == 0.0:
        return CheckResult(name, 1.0, TOLERANCES[name], False,
                           "the stress is zero at every recorded point: the load does not "
                           "strain the model, or [solver] atol is so loose that Newton accepts "
                           "its first guess")
    if not isinstance(model, MaterialModel):
        return CheckResult(name, 0.0, TOLERANCES[name], True, f"max |stress| {peak:.4g} MPa")
    end_states = states[1:, ..., -model.n_state:]  # (solve_recorded gives every stage value)
    rate, _ = model.rate(end_states, broadcast_params(model, _tensors(params, load.time),
                                                      load.batch, load.time))
    inelastic = int((rate.abs().amax(dim=-1) > 0).sum())
    total = rate.shape[0] * rate.shape[1]
    elastic = 1.0 - inelastic / total
    passed = elastic <= TOLERANCES[name]
    detail = (f"max |stress| {peak:.4g} MPa, {inelastic} of {total} steps inelastic"
              + ("" if passed else ": the load hardly leaves the elastic range, so the data "
                 "cannot inform the plastic parameters (load further, or check the units)"))
    return CheckResult(name, elastic, TOLERANCES[name], passed, detail)


def check_model(spec: ModelSpec, load: Experiments | None = None,
                device: str | torch.device = "cpu") -> list[CheckResult]:
    """Run every check of a card's model on ``load`` (default: :func:`informative_path`) at
    :func:`check_parameters`."""
    model = load_model(spec)
    path = check_load(load, device)
    params = check_parameters(spec)
    options = spec.solver
    return [
        check_jacobian(model, params, path, options),
        check_adjoint(model, params, spec.calibrated, path, options),
        check_chunking(model, params, path, options),
        check_integration(model, params, path, options),
        check_response(model, params, path, options),
    ]
