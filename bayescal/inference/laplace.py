"""The MAP by damped Newton, and the Laplace approximation at it.

The posterior of a hierarchical model with informative data is a long curved valley: L-BFGS
and Adam crept along it for hundreds of evaluations, Newton crosses it in a few iterations.
The Hessian comes from differences of adjoint gradients, all points in one batched solve,
and only along the directions the likelihood curves in (:func:`gradient_and_hessian`):
forward differences to steer Newton, central ones at the mode, where the inverse of its
floored negation is the Laplace covariance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyro
import torch
from torch.distributions import biject_to

from bayescal.hierarchy import Solving
from bayescal.inference.checkpoints import FitState
from bayescal.inference.packing import (Packing, congruence, from_centered, to_centered,
                                        to_centered_jacobian)


@dataclass(frozen=True)
class MAPConfig:
    """Settings of the MAP stage: at most ``iterations`` Newton iterations, the Hessian from
    central differences with ``hessian_step`` (unconstrained units); ``warm_start``: each
    solve's Newton starts from the trajectory of the point solved before it
    (:func:`start_near`), else from the predictor."""

    iterations: int = 40
    hessian_step: float = 1e-4
    warm_start: bool = True

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"MAP iterations must be at least 1, got {self.iterations}")
        if not 0 < self.hessian_step < 1:
            raise ValueError(f"the Hessian's difference step must lie in (0, 1), "
                             f"got {self.hessian_step}")


def hessian_points(packing: Packing, central: bool = True) -> int:
    """Points solved by :func:`gradient_and_hessian`: the point itself and one per direction
    (two with central differences)."""
    directions = len(solved_globals(packing)) + packing.specimen_indices().shape[0]
    return 1 + (2 if central else 1) * directions


def solved_globals(packing: Packing) -> torch.Tensor:
    """The global coordinates whose Hessian columns :func:`gradient_and_hessian` takes from
    solved points: those the likelihood sees (:meth:`Packing.likelihood_globals`) but the
    noise, whose column comes without a solve (:func:`noise_column`)."""
    seen = packing.likelihood_globals()
    return seen[seen != packing.slices()["noise_sd"].start]


def noise_column(packing: Packing, gradient: torch.Tensor) -> torch.Tensor:
    """The likelihood's Hessian column along the noise coordinate, exactly, from its
    ``gradient`` at the same point (in any layout with the noise at its packed position).

    The observed stress is ``Normal(s(theta), sigma)`` at ``N`` recorded points, with one
    ``sigma = exp(u)`` for all (``u`` the packed noise coordinate), so with ``S`` the sum of
    squared residuals, ``l = -S exp(-2u) / 2 - N u + const``:
    ``dl/du = S exp(-2u) - N``, ``d2l/du2 = -2 S exp(-2u) = -2 (dl/du + N)``, and every
    other coordinate's gradient is ``exp(-2u)`` times a sum that does not involve ``u``:
    ``d2l/(dx du) = -2 dl/dx``. A differenced point along the noise solved the same
    trajectories as the point itself; this costs none."""
    site = next(site for site in packing.sites if site.name == "noise_sd")
    probe = torch.tensor([0.0, 1.0], dtype=torch.float64)
    if not torch.allclose(biject_to(site.support)(probe), probe.exp(), rtol=1e-15, atol=0):
        raise NotImplementedError(f"the noise's exact Hessian column needs sigma = exp(u); "
                                  f"the noise prior's support {site.support} is unconstrained "
                                  "otherwise")
    noise = site.start
    observed = float(packing.h.experiments.mask.sum())
    column = -2.0 * gradient
    column[noise] = -2.0 * (gradient[noise] + observed)
    return column


def start_near(trajectory: torch.Tensor | None, points: int, strict: bool = True) -> Solving:
    """How to solve ``points`` points near one whose solve gave ``trajectory`` (this rank's
    specimens; None: not known, Newton starts from the predictor): Newton starts every
    point from it, and the solve keeps its own trajectory (:func:`trajectory_of`).

    The Hessian's points lie ``hessian_step`` from the iterate, and late line-search steps
    are short: started from the iterate's trajectory, Newton needs fewer iterations than
    from the step-extrapolating predictor (benchmarks/README.md, MAP), and the result is
    the same within the solver's tolerance."""
    return Solving(strict=strict, warm_start=True,
                   previous=None if trajectory is None else trajectory.repeat(1, points, 1))


def trajectory_of(solving: Solving, point: int, points: int) -> torch.Tensor | None:
    """Point ``point``'s trajectory (this rank's specimens) from the last solve of
    ``solving`` (``points`` points), or None if that solve kept none or failed."""
    if not solving.warm_start or solving.previous is None or solving.reports[-1].n_failed:
        return None
    n = solving.previous.shape[1] // points
    return solving.previous[:, point * n:(point + 1) * n]


def gradient_and_hessian(packing: Packing, u: torch.Tensor, step: float,
                         solving: Solving | None = None, central: bool = True):
    """Log joint, its gradient and the negative Hessian at ``u``; the likelihood's curvature
    from differences of adjoint gradients (central, or forward with ``central=False``), all
    points in one batched solve.

    The log joint is the prior (cheap: no solve) plus the likelihood, which sees only each
    specimen's values in z, the shared values and the noise (the centered layout, ``w =
    to_centered(u)``). So the solves go where the likelihood's curvature is: along the
    shared values and each kind of specimen value (:func:`coloured_hessian`), in ``w``; the
    noise's column is exact from the gradient (:func:`noise_column`), and the population
    locations and spreads, which enter the likelihood only through ``w(u)``, cost no
    solve. With ``l(w)`` the likelihood, ``g`` and ``H_w`` its gradient and
    Hessian at ``w(u)`` and ``J = dw/du``::

        H(u) = H_w-part + H_rest,   H_w-part = J^T H_w J,
        H_rest = Hessian of  prior(u) + g . w(u)   (no solve)

    (the second term carries the likelihood's gradient through the curvature of ``w(u)``).
    That is ``1 + 2 (shared + kinds)`` solved points where differencing every global
    coordinate of ``u`` took ``1 + 2 (shared + 1 + 3 kinds)``; ``central=False`` takes
    forward differences of the likelihood's gradients, ``1 + shared + kinds`` points
    (error of order ``step`` instead of ``step^2``: enough to steer Newton, not for the
    Laplace covariance).
    """
    names = packing.h.non_centered
    local = packing.specimen_indices()  # (kinds, specimens): the same positions in w
    w = to_centered(packing, u[None], names)[0].detach()

    def likelihood(rows):
        return packing.log_likelihood(from_centered(packing, rows, names), solving)

    value, g_w, neg_h_w = coloured_hessian(likelihood, w, step, solved_globals(packing), local,
                                           central)
    noise = packing.slices()["noise_sd"].start
    neg_h_w[:, noise] = neg_h_w[noise, :] = -noise_column(packing, g_w)

    def rest(rows):
        return packing.log_prior(rows) + to_centered(packing, rows, names) @ g_w

    is_global = torch.ones(u.numel(), dtype=torch.bool)
    is_global[local.flatten()] = False
    _, grad, neg_hessian = coloured_hessian(rest, u.detach(), step,
                                            is_global.nonzero().flatten(), local)
    if names:
        jacobian = to_centered_jacobian(packing, u, names)
        neg_hessian = neg_hessian + congruence(jacobian, neg_h_w)
    else:
        neg_hessian = neg_hessian + neg_h_w
    with torch.no_grad():
        prior = float(packing.log_prior(u.detach()[None])[0])
    return prior + value, grad, 0.5 * (neg_hessian + neg_hessian.T)


def coloured_hessian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     step: float, globals_: torch.Tensor, local: torch.Tensor,
                     central: bool = True) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Value, gradient and negative Hessian at ``x`` of ``fn`` (rows (B, dim) -> (B,)),
    from central (or forward) differences of its gradients, all points in one call of
    ``fn``.

    A specimen's values meet other specimens' only through the global coordinates, so the
    Hessian is block-arrow shaped and its columns can share perturbations (Curtis-Powell-Reid
    colouring): one direction per global coordinate (``globals_``) and one per kind of
    specimen value (row ``k`` of ``local`` (kinds, specimens), all specimens' values of that
    kind moved together), ``2 (globals + kinds)`` points instead of ``2 dim``, however many
    specimens there are. A global's column gives the global rows by symmetry; a kind's
    direction gives each specimen's own block. Coordinates in neither stay zero (``fn``
    must not depend on them).
    """
    dim, kinds = x.numel(), local.shape[0]
    directions = torch.zeros(len(globals_) + kinds, dim, dtype=x.dtype)
    directions[torch.arange(len(globals_)), globals_] = 1.0
    for k in range(kinds):
        directions[len(globals_) + k, local[k]] = 1.0
    m = directions.shape[0]
    moves = [x + step * directions] + ([x - step * directions] if central else [])
    rows = torch.cat([x[None], *moves]).detach().requires_grad_(True)
    values = fn(rows)
    values.sum().backward()
    grads = rows.grad
    if central:
        change = -(grads[1:m + 1] - grads[m + 1:]) / (2 * step)  # (direction, dim)
    else:
        change = -(grads[1:] - grads[:1]) / step
    hessian = torch.zeros(dim, dim, dtype=x.dtype)
    hessian[:, globals_] = change[:len(globals_)].T
    hessian[globals_, :] = change[:len(globals_)]
    own = local.T  # (specimen, kind): each specimen's own coordinates
    for k in range(kinds):
        hessian[own, local[k][:, None]] = change[len(globals_) + k][own]
    return float(values[0].detach()), grads[0], hessian


def floored_eigen(neg_hessian: torch.Tensor):
    """Eigen-decomposition with eigenvalues replaced by their magnitude (away from a mode the
    Hessian can be indefinite: a negative curvature still measures how fast the density
    changes) and floored at 1, so that no direction gets a standard deviation above 1 in the
    unconstrained coordinates, where the priors have scales of about 1."""
    eigval, eigvec = torch.linalg.eigh(neg_hessian)
    return eigval.abs().clamp_min(1.0), eigvec


#: Step lengths of the line search, tried one at a time until one gains: the full (trust-region
#: limited) Newton step first, then shorter ones.
LINE_SEARCH = (1.0, 0.5, 0.25, 0.1, 0.03, 0.01)
#: Newton stops once no specimen value, shared value or the noise (unconstrained) moves more.
SETTLED = 2e-3
#: The trust region of a Newton step: at most this far in any unconstrained coordinate
#: (:func:`trust_step`).
MAX_STEP = 2.0


def fit_map(packing: Packing, state: FitState, config: MAPConfig = MAPConfig(), progress=None,
            checkpoint: Callable[[FitState], None] | None = None,
            refine: Callable[[Packing, torch.Tensor], Packing | None] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, Packing]:
    """MAP by damped Newton with the finite-difference Hessian, and the Laplace covariance.

    Each iteration solves one batch for the gradient and Hessian and a line search
    (:func:`_line_search`: Newton's step, damped to the trust region (:func:`trust_step`),
    and shorter ones one at a time until one gains), each started from the trajectory of
    the point solved before it (:func:`start_near`). Stops when half the Newton decrement
    is below 1e-3 nats, no step length improves, or what the likelihood sees has settled
    (no coordinate of :meth:`Packing.likelihood_coordinates` moved by ``SETTLED``): in the
    non-centered coordinates Newton then still creeps along the valley of the spreads for
    tens of iterations (see benchmarks/README.md, MAP). Then (non-centered model) the
    spreads move to their conditional modes (:meth:`Packing.spread_at_specimens`).
    Returns that point (unconstrained) and the inverse floored negative Hessian there.

    The iteration continues from ``state`` (``state.u_map`` is the current iterate while
    ``state.stage`` is "map"), and ``checkpoint(state)`` is called after every step taken,
    so that a long MAP stage killed part-way resumes where it was (the iteration is
    deterministic: the resumed run takes the same steps, to the solver's tolerance, as its
    first solves start from the predictor instead of the last trajectory).

    ``refine(packing, u)`` is called once, near the mode (the first step that gains less
    than :data:`REFINE_GAIN` nats, or at the end): it may return a packing of a hierarchy on
    a finer integration grid, on which the iteration goes on from the same point (at the
    end: for at most :data:`REFINE_ITERATIONS` more). Returns the point, the covariance and
    the packing they belong to.
    """
    max_iterations, step = config.iterations, config.hessian_step
    u = packing.u0.clone() if state.u_map is None else state.u_map.clone()
    h = packing.h
    budget = max_iterations - len(state.losses["map"])
    while True:
        u, paused = _newton(packing, state, u, budget, step, progress, checkpoint,
                            None if refine is None else REFINE_GAIN, config.warm_start)
        if refine is None:
            break
        finer = refine(packing, u)
        refine = None
        if finer is not None:
            packing, h = finer, finer.h
        if paused:  # paused near the mode to refine: go on with the rest of the budget
            budget = max_iterations - len(state.losses["map"])
        elif finer is not None:
            budget = REFINE_ITERATIONS
        else:
            break
    if h.non_centered:
        u = packing.spread_at_specimens(u.detach()[None])[0]
    value, grad, neg_hessian = gradient_and_hessian(packing, u, step)
    eigval, eigvec = floored_eigen(neg_hessian)
    return u.detach(), (eigvec / eigval) @ eigvec.T, packing


#: ``fit_map`` offers the grid refinement once a Newton step gains less than this (nats).
REFINE_GAIN = 1.0
#: Newton iterations at most after a refinement offered once Newton had stopped: the grid
#: changed the likelihood little, so the mode moved little; without a bound Newton creeps
#: along the valley of the spreads (see :func:`fit_map`) for as long as the first stage did.
REFINE_ITERATIONS = 8


def _newton(packing: Packing, state: FitState, u: torch.Tensor, iterations: int, step: float,
            progress, checkpoint, pause_gain: float | None, warm_start: bool = True
            ) -> tuple[torch.Tensor, bool]:
    """Damped Newton steps of :func:`fit_map` from ``u``; returns the point and whether it
    paused after a step that gained less than ``pause_gain``."""
    points = hessian_points(packing, central=False)
    at_u = None  # u's trajectory: where Newton starts the solves near u
    for _ in range(iterations):
        solving = start_near(at_u, points)
        value, grad, neg_hessian = gradient_and_hessian(packing, u, step, solving,
                                                        central=False)
        at_u = trajectory_of(solving, 0, points) if warm_start else None
        state.losses["map"].append(-value)
        eigval, eigvec = floored_eigen(neg_hessian)
        delta = eigvec @ ((eigvec.T @ grad) / eigval)  # Newton's step
        if progress is not None:
            progress.update(1)
            progress.set_postfix(stage="map", log_joint=f"{value:.6g}")
        if 0.5 * float(grad @ delta) < 1e-3:
            break
        candidate, gain, at_candidate = _line_search(
            packing, u, trust_step(eigval, eigvec, grad, MAX_STEP), value, at_u)
        if candidate is None:
            break
        at_u = at_candidate if warm_start else None
        moved = packing.likelihood_coordinates(torch.stack([u, candidate]))
        u = candidate.detach()
        if float((moved[1] - moved[0]).abs().max()) < SETTLED:
            break  # the rest is the spreads' valley, which the next step settles exactly
        if checkpoint is not None:
            state.u_map = u.clone()
            checkpoint(state)
        if pause_gain is not None and gain < pause_gain:
            return u, True
    return u, False


def trust_step(eigval: torch.Tensor, eigvec: torch.Tensor, grad: torch.Tensor,
               limit: float) -> torch.Tensor:
    """Newton's step for the curvatures ``eigval`` (positive) along ``eigvec`` and the
    gradient ``grad``, damped to at most ``limit`` in any coordinate: ``(H + lam I)^-1 grad``
    with the smallest ``lam >= 0`` that keeps it there (Levenberg-Marquardt; ``lam`` by
    bisection on the eigenvalues, no solve).

    Where the curvature of a few directions is small (the valley of the spreads, a floored
    negative curvature), Newton's step there is long. Scaling the whole step down to the
    trust region shortened the well-determined directions with it (a step of 261 cut
    130-fold); damping shortens the flat directions most and leaves the curved ones near
    Newton's. With the line search below, the MAP of 128 synthetic specimens took 24
    Newton iterations instead of 35, of 64 voce-jc specimens 21 instead of 39
    (benchmarks/README.md, ``map_trees.py``)."""
    projected = eigvec.T @ grad
    step = eigvec @ (projected / eigval)
    if float(step.abs().max()) <= limit:
        return step
    # |step(lam)| <= |grad| / lam in the 2-norm, so ``high`` starts inside the region
    low, high = 0.0, float(grad.norm()) / limit
    for _ in range(BISECTIONS):
        middle = 0.5 * (low + high)
        if float((eigvec @ (projected / (eigval + middle))).abs().max()) > limit:
            low = middle
        else:
            high = middle
    return eigvec @ (projected / (eigval + high))


#: Bisections of :func:`trust_step`'s damping: its interval shrinks to 2^-50 of its start.
BISECTIONS = 50


def _line_search(packing: Packing, u: torch.Tensor, delta: torch.Tensor, value: float,
                 start: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor | None, float, torch.Tensor | None]:
    """The step ``delta`` from ``u`` (log joint ``value``; :func:`trust_step`), shortened
    along :data:`LINE_SEARCH` until it gains, each length also valued with the populations
    moved to their conditional mode given the specimens' values
    (:meth:`Packing.spread_at_specimens` with ``joint``, non-centered models); returns the
    longest length's better point, its gain and its trajectory (:func:`trajectory_of`), or
    ``(None, 0, None)`` if no length gains. A point whose solve fails, or whose values are
    not finite, counts as -inf. Newton starts the solves from ``start``, the trajectory at
    ``u`` (:func:`start_near`).

    The moved point has the same specimen values, so the same likelihood: it costs no solve
    of its own, only its prior. One length a solve, the longest first: a Newton step that
    fails usually gains at half or a quarter of its length, where the batch of the five
    shorter lengths that this search solved at once before cost a solve of five points
    (in the 64-specimen fit, 18 of 31 line searches needed it: 10.6 s of 31.6 s); taking
    the longest length that gains, not the batch's best, also moved Newton faster
    (one-off fits: 64 synthetic specimens in 23 iterations instead of 32, before
    :func:`trust_step`; benchmarks/README.md, ``map_trees.py``).
    """
    for alpha in LINE_SEARCH:
        candidates = (u + alpha * delta)[None]
        solving = start_near(start, 1, strict=False)
        with torch.no_grad(), pyro.validation_enabled(False):
            likelihood = packing.log_likelihood(candidates, solving)
            if packing.h.non_centered:
                candidates = torch.cat([candidates,
                                        packing.spread_at_specimens(candidates, joint=True)])
                likelihood = likelihood.repeat(2)
            trial = packing.log_prior(candidates) + likelihood
        trial = torch.nan_to_num(trial, nan=-torch.inf)
        best = int(trial.argmax())
        if trial[best] > value:  # (the moved point shares the length's specimen values)
            return candidates[best], float(trial[best]) - value, trajectory_of(solving, 0, 1)
    return None, 0.0, None
