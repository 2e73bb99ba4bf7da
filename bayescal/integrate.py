"""Chunked implicit integration over pyzag, robust to Newton failures.

One solver path serves fit, NUTS, predict, simulate and check:

* :func:`plan_substeps` chooses the integration steps of each recorded interval so that
  the estimated stress error stays below a tolerance (step doubling), because one implicit
  step per recorded point is far off; :func:`refine` puts those sub-steps between the
  recorded points;
* :func:`integrate` solves ``n_chunk`` steps at a time (:func:`chunk_steps`) with pyzag's
  blocked Newton and, when asked, differentiates with pyzag's chunked adjoint
  (:func:`pyzag.nonlinear.solve_adjoint`), whose chunks are longer than Newton's
  (:func:`adjoint_chunk_steps`); a chunk that fails (non-convergence or NaN,
  which pyzag's Newton counts as converged) is re-solved in halves down to single steps,
  and whatever still fails is reported per specimen and left as NaN, never as zeros;
* :func:`simulate` returns stress at the recorded points only.

Every call builds a fresh pyzag solver, because a pyzag solver caches the last trajectory
for its adjoint: two forward solves through one solver before one backward would give
wrong gradients, silently.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import torch
from pyzag import chunktime, nonlinear
from pyzag.operators.dense import DenseBlockVector

from bayescal.material import Integrable, MaterialModel, StrainControlledResidual
from bayescal.schemes import DEFAULT_SCHEME, SCHEMES

#: pyzag announces, once per process when its first solver is built, a torch.compile setting
#: that matters only to compiled models (which it has already made safe for its adjoint):
#: noise to bayescal's users, silenced where the solver is built.
PYZAG_COMPILE_NOTICE = "pyzag lowered torch._functorch.config.donated_buffer"

PREDICTORS = {
    "step-extrapolating": nonlinear.StepExtrapolatingPredictor,
    "last-step": nonlinear.LastStepPredictor,
    "zero": nonlinear.ZeroPredictor,
}


@dataclass(frozen=True)
class SolverOptions:
    """Settings of the time integration (the card's ``[solver]`` table).

    ``scheme`` is the time discretisation of the built-in models (:mod:`bayescal.schemes`).
    By default the integration steps per recorded interval are chosen automatically
    (:func:`plan_substeps`) so that the estimated stress error at the recorded points stays
    below ``tolerance`` (MPa). ``substeps`` fixes them by hand instead: ``substeps`` steps per
    recorded interval, ``transient_substeps`` (default four times as many) in an interval
    that starts with a change of strain rate.

    ``n_chunk`` steps are solved together in one Newton system; by default (``None``) the
    number follows the batch of paths solved together (:func:`chunk_steps`).
    ``adjoint_chunk`` steps are solved together in the adjoint (no Newton there: a linear
    block system whatever its length); by default (``None``) also chosen from the batch
    (:func:`adjoint_chunk_steps`).

    ``max_span``: with ``tolerance`` and a scheme of order two or more
    (:data:`MIN_SPAN_ORDER`), a step may span up to this many recorded intervals
    where every path is one straight line in time across them (:func:`linear_joins`: a
    designed load, never noisy measured strain); the stress at the points inside comes from
    the scheme's collocation polynomial (:func:`recorded_states`). 1: a step never spans
    two intervals.
    """

    n_chunk: int | None = None
    scheme: str = DEFAULT_SCHEME
    tolerance: float = 0.05
    substeps: int | None = None
    transient_substeps: int | None = None
    rtol: float = 1e-12
    atol: float = 1e-8
    max_iterations: int = 40
    first_chunk: int = 1
    predictor: str = "step-extrapolating"
    retry: bool = True
    max_substeps: int = 512
    max_span: int = 8
    adjoint_chunk: int | None = None

    @property
    def automatic(self) -> bool:
        """Whether the sub-steps are chosen from ``tolerance`` (no ``substeps`` given)."""
        return self.substeps is None

    def for_batch(self, batch: int) -> SolverOptions:
        """These options with ``n_chunk`` and ``adjoint_chunk`` fixed for a solve of
        ``batch`` paths."""
        n_chunk = chunk_steps(batch) if self.n_chunk is None else self.n_chunk
        adjoint = (adjoint_chunk_steps(batch, n_chunk) if self.adjoint_chunk is None
                   else self.adjoint_chunk)
        return replace(self, n_chunk=n_chunk, adjoint_chunk=adjoint)


#: Steps per chunk without a card's ``n_chunk``: ``(most paths, steps)``, the first row
#: that admits the batch; larger batches take :data:`SHORTEST_AUTOMATIC_CHUNK`.
AUTOMATIC_CHUNKS = ((127, 20), (511, 10))
SHORTEST_AUTOMATIC_CHUNK = 5


def chunk_steps(batch: int) -> int:
    """Steps per chunk for a solve of ``batch`` paths when the card does not fix them.

    A small batch costs per torch call, so long chunks (fewer calls) pay. A large one costs
    per element, and there a long chunk loses: Newton on a chunk carries each step's error
    into the next, so it needs more iterations than on a short one, and on a stiff flow
    rule (voce-jc) more chunks fail and are re-solved in halves. The rows are the fastest
    chunk lengths measured for the built-in models from 12 to 1024 paths
    (``benchmarks/chunks.py``; benchmarks/README.md, chunks).
    """
    for most, steps in AUTOMATIC_CHUNKS:
        if batch <= most:
            return steps
    return SHORTEST_AUTOMATIC_CHUNK


#: The adjoint's chunks hold about this many path-steps (steps times paths solved together),
#: and at least :data:`ADJOINT_MIN_STEPS` steps and the Newton chunk's length.
ADJOINT_PATH_STEPS = 8192
ADJOINT_MIN_STEPS = 40


def adjoint_chunk_steps(batch: int, n_chunk: int) -> int:
    """Steps per chunk of the adjoint for a solve of ``batch`` paths whose Newton chunks
    have ``n_chunk`` steps.

    Newton's chunk length trades torch calls against iterations (:func:`chunk_steps`); the
    adjoint has no iterations: each chunk is one evaluation of the residual, one
    vector-Jacobian product and one block substitution, whatever its length, so fewer,
    longer chunks cost fewer calls. Its limit is memory and cache: a chunk of ``steps x
    batch`` path-steps holds the residual's autograd graph. The budget and the floor are
    the fastest measured (``benchmarks/adjoint_chunks.py``; benchmarks/README.md,
    adjoint chunks).
    """
    return max(n_chunk, ADJOINT_MIN_STEPS, ADJOINT_PATH_STEPS // max(batch, 1))


@dataclass(frozen=True)
class Grid:
    """An integration grid: ``time``, ``strain`` (and ``temperature`` where the data have
    it) of shape ``(step, batch)``, and where the recorded points lie on it: each in the
    step ``recorded`` ``(n_rec,)`` (the index of the grid point that ends it), at the
    fraction ``theta`` ``(n_rec, batch)`` of that step; ``theta`` is None where every
    recorded point is a grid point (the end of its step)."""

    time: torch.Tensor
    strain: torch.Tensor
    recorded: torch.Tensor
    temperature: torch.Tensor | None = None
    theta: torch.Tensor | None = None

    @property
    def n_steps(self) -> int:
        return self.time.shape[0]

    def repeat(self, reps: int) -> Grid:
        """The same grid for ``reps`` copies of the batch (batch index ``r * batch + b``)."""
        if reps == 1:
            return self
        tile = lambda x: None if x is None else x.repeat(1, reps)  # noqa: E731
        return Grid(tile(self.time), tile(self.strain), self.recorded, tile(self.temperature),
                    tile(self.theta))


@dataclass
class SolveReport:
    """What happened in a solve: chunk retries and specimens that still failed."""

    retries: int = 0
    failed: torch.Tensor | None = None  # bool, (batch,)
    extra: dict = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return 0 if self.failed is None else int(self.failed.sum())

    def failed_indices(self) -> list[int]:
        return [] if self.failed is None else self.failed.nonzero().flatten().tolist()


def rate_changes(time: torch.Tensor, strain: torch.Tensor, tol: float = 0.05) -> torch.Tensor:
    """Intervals (``n_rec - 1``,) where any specimen's strain rate changes, the first included."""
    dt = torch.diff(time, dim=0)
    rate = torch.where(dt > 0, torch.diff(strain, dim=0) / torch.where(dt > 0, dt, 1.0), 0.0)
    jump = (rate[1:] - rate[:-1]).abs() > tol * torch.maximum(rate[1:].abs(), rate[:-1].abs())
    first = torch.ones(1, dtype=torch.bool, device=time.device)
    return torch.cat([first, jump.any(dim=-1)])


def fixed_substeps(time: torch.Tensor, strain: torch.Tensor, options: SolverOptions,
                   changes: torch.Tensor | None = None) -> torch.Tensor:
    """Integration steps per recorded interval ``(n_rec - 1,)`` set by hand: ``substeps``,
    or ``transient_substeps`` where the strain rate changes (``changes``, by default
    :func:`rate_changes` of the paths)."""
    if options.automatic:
        raise ValueError("the solver options choose their sub-steps from a tolerance")
    transient = options.transient_substeps or 4 * options.substeps
    changes = rate_changes(time, strain) if changes is None else changes
    return torch.where(changes, transient, options.substeps)


#: Relative difference of two intervals' rates (strain, temperature) under which
#: :func:`linear_joins` takes them for one straight line: rounding of a designed path,
#: far below any measured path's noise.
LINEAR_RTOL = 1e-9


def linear_joins(time: torch.Tensor, strain: torch.Tensor,
                 temperature: torch.Tensor | None = None) -> torch.Tensor:
    """Intervals (``n_rec - 1``,) that continue the previous interval's straight line in
    time, strain (and temperature) for every path, both of positive length (False for the
    first). Only across such joins may one step span several recorded intervals: a step
    takes strain linear in time, so across a kink (or a measured path's noise) it would
    integrate another load than the recorded one."""
    dt = torch.diff(time, dim=0)
    positive = dt > 0
    joins = positive[1:] & positive[:-1]
    for x in (strain, temperature):
        if x is None:
            continue
        rate = torch.diff(x, dim=0) / torch.where(positive, dt, 1.0)
        scale = torch.maximum(rate[1:].abs(), rate[:-1].abs())
        joins = joins & ((rate[1:] - rate[:-1]).abs() <= LINEAR_RTOL * scale)
    first = torch.zeros(1, dtype=torch.bool, device=time.device)
    return torch.cat([first, joins.all(dim=-1)])


def spans(substeps: torch.Tensor) -> list[tuple[int, int, int]]:
    """The steps of ``substeps`` (``n_rec - 1``,) as ``(first interval, intervals, steps)``:
    a whole number ``m >= 1`` is ``m`` steps over its interval; a fraction ``1 / k`` (``k``
    a power of two) is one step over ``k`` consecutive intervals that all read ``1 / k``
    (read from the left: a group starts where the previous one ended)."""
    values = substeps.tolist()
    found, i = [], 0
    while i < len(values):
        m = values[i]
        if m >= 1:
            if m != int(m):
                raise ValueError(f"substeps: interval {i} has {m:g} steps, neither a whole "
                                 "number nor 1/k")
            found.append((i, 1, int(m)))
            i += 1
            continue
        k = round(1 / m) if m > 0 else 0
        if k < 2 or k & (k - 1) or abs(k * m - 1) > 1e-12 or values[i:i + k] != [m] * k:
            raise ValueError(f"substeps: intervals {i}..{i + max(k, 1) - 1} are not {k} "
                             f"intervals of 1/{k} step each (got {values[i:i + max(k, 1)]})")
        found.append((i, k, 1))
        i += k
    return found


def refine(time: torch.Tensor, strain: torch.Tensor, substeps: torch.Tensor,
           temperature: torch.Tensor | None = None) -> Grid:
    """The integration grid of a recorded path; ``time``, ``strain`` (and ``temperature``)
    have shape ``(n_rec, batch)``, ``substeps`` (``n_rec - 1``,) the steps of each recorded
    interval (:func:`spans`): ``m`` divides an interval evenly, ``1 / k`` makes one step of
    ``k`` intervals (which the caller has found linear: :func:`linear_joins`).

    Fractions are shared by all specimens (so the batch shares one grid shape); strain and
    temperature are linear in time within an interval. A recorded point inside a step
    gets its fraction of that step's time (``Grid.theta``).
    """
    if substeps.numel() != time.shape[0] - 1:
        raise ValueError(f"substeps must be {time.shape[0] - 1} positive counts")
    if substeps.numel() and float(substeps.min()) <= 0:
        raise ValueError(f"substeps must be {time.shape[0] - 1} positive counts")
    paths = [x for x in (time, strain, temperature) if x is not None]
    pieces = [[x[:1]] for x in paths]
    fractions: dict[int, torch.Tensor] = {}
    recorded = [0]
    inside: list[tuple[int, int, int]] = []  # (recorded point, group start, group end)
    for first, intervals, steps in spans(substeps):
        if intervals == 1:
            if steps not in fractions:
                fractions[steps] = torch.arange(1, steps + 1, dtype=time.dtype,
                                                device=time.device)[:, None] / steps
            u = fractions[steps]
            for x, parts in zip(paths, pieces):
                parts.append(x[first] + u * (x[first + 1] - x[first]))
        else:
            for x, parts in zip(paths, pieces):
                parts.append(x[first + intervals][None])
            inside += [(first + j, first, first + intervals) for j in range(1, intervals)]
        node = recorded[-1] + steps
        recorded += [node] * intervals
    refined = [torch.cat(parts) for parts in pieces]
    theta = None
    if inside:
        theta = torch.ones_like(time)
        points, starts, ends = (torch.tensor(v, device=time.device) for v in zip(*inside))
        theta[points] = (time[points] - time[starts]) / (time[ends] - time[starts])
    return Grid(
        time=refined[0],
        strain=refined[1],
        recorded=torch.tensor(recorded, dtype=torch.long, device=time.device),
        temperature=refined[2] if temperature is not None else None,
        theta=theta,
    )


def stage_weights(theta: torch.Tensor, stage_times: tuple[float, ...]) -> torch.Tensor:
    """Weights ``(..., 1 + stages)`` of the step's start and its stage values in the value
    at the fraction ``theta`` of the step: Lagrange's basis on ``(0, *stage_times)``. For a
    collocation scheme (Radau IIA) that is its collocation polynomial, of the scheme's stage
    order; for backward Euler the straight line between the step's ends. At ``theta = 1``
    the weights are exactly those of the last stage (the end of the step)."""
    nodes = (0.0, *stage_times)
    weights = []
    for i, ci in enumerate(nodes):
        w = torch.ones_like(theta)
        for j, cj in enumerate(nodes):
            if j != i:
                w = w * (theta - cj) / (ci - cj)
        weights.append(w)
    return torch.stack(weights, dim=-1)


def recorded_states(grid: Grid, states: torch.Tensor, stage_times: tuple[float, ...]
                    ) -> torch.Tensor:
    """The states ``(n_rec, batch, n_state)`` at the grid's recorded points, from the
    solve's ``states`` ``(step, batch, stages * n_state)`` (every stage value, as
    :func:`integrate` returns them with ``stages``; or the end-of-step states where the
    grid has no ``theta``)."""
    if grid.theta is None:
        return states[grid.recorded]
    s = len(stage_times)
    n = states.shape[-1] // s
    step = states[grid.recorded].unflatten(-1, (s, n))  # (n_rec, batch, s, n)
    start = states[(grid.recorded - 1).clamp(min=0)][..., None, -n:]  # the step's start
    values = torch.cat([start, step], dim=-2)
    weights = stage_weights(grid.theta, stage_times)  # (n_rec, batch, 1 + s)
    return (weights[..., None] * values).sum(dim=-2)


def solve_recorded(model: Integrable, params: Mapping[str, torch.Tensor | float], grid: Grid,
                   options: SolverOptions = SolverOptions(), adjoint: bool = True,
                   guess: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, SolveReport]:
    """:func:`integrate` on ``grid``, and the states at its recorded points: returns those
    ``(n_rec, batch, n_state)``, every stage value ``(step, batch, stages * n_state)`` (a
    warm start's ``guess`` for the next solve; the end-of-step state is the last
    ``n_state``) and the report.

    The stage values, not only the end-of-step states: from end-of-step states the stage
    values are interpolated (:func:`_stage_guess`), which is off where a relaxation curves
    within a step, and Newton spent iterations on that even at the trajectory's own
    parameters (the 304L MAP fit's Hessian solves: 5 iterations a chunk)."""
    states, report = integrate(model, params, grid, options, adjoint, guess, stages=True)
    if grid.theta is None:
        at_points = states[grid.recorded][..., -model.n_state:]
    else:
        at_points = recorded_states(grid, states, model.stage_times(options.scheme))
    return at_points, states, report


def broadcast_params(model: Integrable, params: Mapping[str, torch.Tensor | float],
                     batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every model parameter as a tensor of shape ``(batch,)`` (scalars are expanded)."""
    missing = [name for name in model.parameters if name not in params]
    if missing:
        raise KeyError(f"model {model.name!r} needs parameters {missing}")
    return {
        name: torch.as_tensor(params[name], dtype=like.dtype, device=like.device).expand(batch)
        for name in model.parameters
    }


class SmallBlockScan(chunktime.BidiagonalInverseOperator):
    """Block forward substitution for the small blocks of material models.

    Substitution ``x_k = A_k^-1 (r_k - B_k x_(k-1))`` is ``x_k = y_k + G_k x_(k-1)`` with
    ``y_k = A_k^-1 r_k`` and ``G_k = -A_k^-1 B_k``: two batched LU solves for the whole
    chunk (with the factors pyzag made of the diagonal blocks), then one fused
    multiply-add (``baddbmm_``, in place) per step. pyzag's generic Thomas solve wraps every
    block in operator objects; for blocks of 2-6 states that bookkeeping dominated the cost.

    Measured and dropped (``benchmarks/README.md``, gradient section): a prefix scan
    (Hillis-Steele, ``log2(steps)`` batched matrix products), slower than this loop but for
    long chunks of very few specimens; and one dense unit-triangular solve of the whole
    chunk, faster only where the batch is small (1.2-1.4x at 20 steps of 12 specimens),
    much slower for hundreds, with memory quadratic in the chunk.

    A singular block gives non-finite values, which the retrying solver detects.
    """

    def __init__(self, A, B, *args, **kwargs) -> None:
        super().__init__(A, B, *args, **kwargs)
        if A.lu is None:  # pyzag factors the diagonal of its Newton and adjoint systems
            A.lu, A.pivots = torch.linalg.lu_factor_ex(A.data)[:2]
        self.lu, self.pivots = A.lu, A.pivots
        self.B_data = B.data

    def matvec(self, v):
        x = torch.linalg.lu_solve(self.lu, self.pivots, v.data.unsqueeze(-1))
        if self.nblk == 1:
            return DenseBlockVector(x.squeeze(-1))
        solved_b = torch.linalg.lu_solve(self.lu[1:], self.pivots[1:], self.B_data)  # -G_k
        # in place, step by step: x_k -= (A_k^-1 B_k) x_(k-1); an out-of-place baddbmm
        # copied y_k first and a stack copied every step again
        steps = x.unbind(0)
        for b, previous, y in zip(solved_b.unbind(0), steps, steps[1:]):
            y.baddbmm_(b, previous, alpha=-1.0)
        return DenseBlockVector(x.squeeze(-1))


class _ChunkNewton(chunktime.ChunkNewtonRaphson):
    """pyzag's chunk Newton that, on a chunk of several steps, gives up on a specimen whose
    iteration cannot converge within the remaining iterations, so that the retrying solver
    re-solves the chunk in halves at once instead of after ``max_iterations``.

    A predictor that overshoots into the exponential range of a stiff flow rule (voce-jc)
    leaves Newton creeping back at a fixed ratio per iteration (about 0.37 from residuals
    of 1e20 and more); 40 such iterations then failed, and halves converged. A specimen is
    given up when, after at least three iterations, its worst step's residual (relative to
    what pyzag accepts: ``atol``, or ``rtol`` times the step's first residual) shrinks by a
    ratio above 0.1 (Newton's linear phase, not its quadratic one) too slow to converge in
    the iterations left. pyzag stops iterating a specimen whose residual norm
    is NaN and records it as failed: a given-up specimen's norm is set to NaN. A chunk of
    one step is never given up (nothing smaller to retry).
    """

    MIN_ITERATIONS = 3
    LINEAR_RATIO = 0.1

    #: The model's bound on Newton iterates (:meth:`StrainControlledResidual.iterate_bound`),
    #: applied to the predictor's guess and to every iterate; None: no bound.
    bound: Callable[[torch.Tensor], torch.Tensor] | None = None

    def solve(self, fn, x0):
        self._iteration, self._last, self._target = 0, None, None
        if self.bound is not None:
            x0 = DenseBlockVector(self.bound(x0.data))
        return super().solve(fn, x0)

    def _newton_step(self, x, J, fn, R0, take_step):
        """pyzag's Newton step, the new iterate bounded."""
        if self.bound is None:
            return super().step(x, J, fn, R0, take_step)
        candidate = DenseBlockVector(self.bound((x - J.inverse().matvec(R0)).data))
        x = candidate.where(torch.any(take_step, dim=0), x)
        R, J = fn(x)
        return x, R, J, R.norm(dim=-1)

    def step(self, x, J, fn, R0, take_step):
        if self._target is None:  # pyzag's test: converged at atol, or rtol of the start
            self._target = (self.rtol * R0.norm(dim=-1)).clamp_min(self.atol)
        x, R, J, nR = self._newton_step(x, J, fn, R0, take_step)
        if nR.shape[0] == 1:
            return x, R, J, nR
        self._iteration += 1
        distance = (nR / self._target).amax(dim=0)  # converged at <= 1
        if self._last is not None and self._iteration >= self.MIN_ITERATIONS:
            ratio = (distance / self._last).clamp(max=1.0)
            left = self.miter - self._iteration
            hopeless = (ratio > self.LINEAR_RATIO) & (distance * ratio**left > 1.0)
            nR = torch.where(hopeless, torch.nan, nR)
        self._last = distance
        return x, R, J, nR


class ShiftedTrajectoryPredictor(nonlinear.FullTrajectoryPredictor):
    """Newton's start for a chunk from a whole trajectory ``history`` solved at nearby
    parameters (a warm start): the chunk's part of it, moved by how far this solve's
    state before the chunk lies from the trajectory's there.

    Reason: a line-search or Hessian point has other parameters than the trajectory's
    solve, and once the solution has moved off the trajectory (a higher flow stress, a
    stiffer modulus) the states of the next steps have moved about as far: an elastic step
    carries an offset unchanged, a plastic one relaxes it slowly. The trajectory as it
    stands puts the whole chunk that far off and Newton spends its first iterations
    coming back; moved, it starts where the solution goes. In the MAP fit of 64 synthetic
    specimens the line searches' chunks took 2.9 Newton iterations on average instead of
    4.4, the Hessians' 2.0 instead of 2.25 (benchmarks/README.md, ``map_trees.py``)."""

    def predict(self, results: torch.Tensor, k: int, kinc: int) -> torch.Tensor:
        chunk = self.history[k:k + kinc]
        if k < 1:
            return chunk
        return chunk + (results[k - 1] - self.history[k - 1])


#: Specimen solves per batch where many are solved without gradients (a fit's draws, the
#: importance check, ``predict``): large enough that each torch call's overhead is shared,
#: small enough that a chunk's tensors stay in cache. 128 Laplace draws of the 304L set
#: (8192 paths) took 65.7 s in batches of 1024, 64.9 s of 512 and 79.9 s of 8192.
MAX_BATCH = 1024


#: A failed chunk is re-solved for its failed specimens alone when they are at most
#: ``RESTRICT_SHARE`` of a batch of at least ``RESTRICT_MIN_BATCH``, else for the whole batch
#: (the specimens that converged restart from their solution). In batches of hundreds (a
#: fit's draws) a few specimens fail a chunk, and re-solving all of them cost more than the
#: first solve; in a dozen the cost is per torch call, not per specimen, and most fail
#: together (benchmarks/README.md, gradient section).
RESTRICT_SHARE = 0.25
RESTRICT_MIN_BATCH = 64


class _RetryingSolver(nonlinear.RecursiveNonlinearEquationSolver):
    """pyzag's chunked solver, re-solving failed chunks in halves down to single steps
    (only the failed specimens where the factory can be restricted to them, see
    :data:`RESTRICT_SHARE`)."""

    def __init__(self, factory: nonlinear.NonlinearFunctionOperatorFactory,
                 options: SolverOptions, report: SolveReport,
                 guess: torch.Tensor | None = None,
                 strain_rate: torch.Tensor | None = None) -> None:
        super().__init__(
            factory,
            step_generator=nonlinear.StepGenerator(
                options.n_chunk, first_block_size=options.first_chunk if options.n_chunk > 1 else 0
            ),
            predictor=(PREDICTORS[options.predictor]() if guess is None
                       else ShiftedTrajectoryPredictor(guess)),
            # the built-in models' dense blocks; NEML2's factory brings its own block types
            direct_solve_operator=(SmallBlockScan if isinstance(factory, StrainControlledResidual)
                                   else chunktime.BidiagonalThomasFactorization),
            nonlinear_solver=(_ChunkNewton if options.retry else chunktime.ChunkNewtonRaphson)(
                rtol=options.rtol, atol=options.atol, miter=options.max_iterations,
                record_failed=True,
            ),
            convert_nan_gradients=False,
        )
        self.retry = options.retry
        self.options = options
        self.report = report
        self.strain_rate = strain_rate  # (batch,): each path's largest, for the bound
        if strain_rate is not None and options.retry:
            self.nonlinear_solver.bound = factory.iterate_bound(strain_rate)

    def _newton(self, prev, guess, forces):
        newton = self.nonlinear_solver
        newton.failed = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = super().block_update(prev, guess, forces)
        bad = newton.failed | ~torch.isfinite(x).all(dim=-1).all(dim=0)
        dead = self.report.failed
        if dead is None:
            return x, bad
        # a specimen that failed in an earlier chunk stays NaN: its NaN start need not give
        # NaN through Newton (pyzag stops iterating a NaN residual and keeps the guess)
        return torch.where(dead[None, :, None], torch.nan, x), bad & ~dead

    def block_update(self, prev_solution, solution, forces):
        x, bad = self._newton(prev_solution, solution, forces)
        if not bad.any():
            return x
        steps = x.shape[0]
        if steps == 1 or not self.retry:
            x = torch.where(bad[None, :, None], torch.nan, x)
            failed = self.report.failed
            self.report.failed = bad if failed is None else failed | bad
            return x
        self.report.retries += 1
        restrict = getattr(self.func, "restrict", None)
        if (restrict is None or bad.numel() < RESTRICT_MIN_BATCH
                or RESTRICT_SHARE * bad.numel() < bad.sum()):
            # re-solve the whole batch
            restart = torch.where(bad[None, :, None], prev_solution[-1:].expand_as(x), x)
            return self._halves(self, prev_solution, restart, forces)
        # re-solve only the failed specimens, by a solver of their own sub-batch
        index = bad.nonzero().flatten()
        report = SolveReport(failed=torch.zeros(len(index), dtype=torch.bool, device=x.device))
        solver = _RetryingSolver(restrict(index), self.options, report, None,
                                 None if self.strain_rate is None else self.strain_rate[index])
        sub = self._halves(solver, prev_solution[:, index], prev_solution[-1:, index].expand(
            steps, -1, -1), [f[:, index] for f in forces])
        self.report.retries += report.retries
        self.report.failed[index] |= report.failed
        return x.index_copy(1, index, sub)

    def rewind(self, output_grad):
        """pyzag's chunked adjoint, in chunks of ``options.adjoint_chunk`` steps rather
        than the forward solve's (:func:`adjoint_chunk_steps`; set, like ``n_chunk``, by
        :meth:`SolverOptions.for_batch` before the solver is made). pyzag takes the
        adjoint's chunks from the solver's step generator; any chunking solves the same
        linear system (the gradients agree to rounding)."""
        if len(self.result) < 3:  # pyzag's adjoint needs three points in a chunk
            return super().rewind(output_grad)
        newton_chunks = self.step_generator
        self.step_generator = nonlinear.StepGenerator(self.options.adjoint_chunk)
        try:
            return super().rewind(output_grad)
        finally:
            self.step_generator = newton_chunks

    @staticmethod
    def _halves(solver, prev_solution, restart, forces):
        """``solver``'s chunk solved as two halves, from the starting trajectory ``restart``."""
        half = restart.shape[0] // 2
        first = solver.block_update(prev_solution, restart[:half], [f[: half + 1] for f in forces])
        second = solver.block_update(first[-1:], restart[half:], [f[half:] for f in forces])
        return torch.cat([first, second])


def _stage_guess(guess: torch.Tensor, stages: int, scheme: str) -> torch.Tensor:
    """A trajectory of end-of-step states ``(step, batch, n)`` as a guess for every stage:
    each stage value interpolated linearly in time within its step."""
    if stages == 1:
        return guess
    c = torch.tensor(SCHEMES[scheme].c, dtype=guess.dtype, device=guess.device)
    start = torch.cat([guess[:1], guess[:-1]])
    return (start[:, :, None] + c[:, None] * (guess - start)[:, :, None]).flatten(-2)


def path_strain_rate(grid: Grid) -> torch.Tensor:
    """Each path's largest absolute total strain rate over the grid's steps, ``(batch,)``
    (zero for a path that never strains)."""
    dt = torch.diff(grid.time, dim=0)
    rate = torch.diff(grid.strain, dim=0).abs() / torch.where(dt > 0, dt, 1.0)
    return torch.where(dt > 0, rate, 0.0).amax(dim=0)


def integrate(model: Integrable, params: Mapping[str, torch.Tensor | float], grid: Grid,
              options: SolverOptions = SolverOptions(), adjoint: bool = True,
              guess: torch.Tensor | None = None, stages: bool = False
              ) -> tuple[torch.Tensor, SolveReport]:
    """Integrate from a zero state over ``grid``; returns states ``(step, batch, n_state)``
    (with ``stages``, every stage value: ``(step, batch, stages * n_state)``).

    With ``adjoint`` the result is differentiable with respect to ``params`` through pyzag's
    chunked adjoint. Specimens whose solve failed are NaN and listed in the report.
    ``guess``, a whole trajectory (e.g. the previous optimiser step's), replaces the
    predictor as Newton's starting point (:class:`ShiftedTrajectoryPredictor`): every stage
    value, as ``stages`` returns them, or end-of-step states, whose stage values are then
    interpolated (:func:`_stage_guess`).
    """
    batch = grid.time.shape[1]
    options = options.for_batch(batch)
    p = broadcast_params(model, params, batch, grid.time)
    n_stages = model.stages(options.scheme)
    factory = model.factory(p, options.scheme)
    report = SolveReport(failed=torch.zeros(batch, dtype=torch.bool, device=grid.time.device))
    if guess is not None and guess.shape[-1] != n_stages * model.n_state:
        guess = _stage_guess(guess, n_stages, options.scheme)
    strain_rate = (path_strain_rate(grid) if isinstance(factory, StrainControlledResidual)
                   else None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PYZAG_COMPILE_NOTICE)
        solver = _RetryingSolver(factory, options, report, guess, strain_rate)
    y0 = model.initial_state(batch, grid.time).repeat(1, n_stages)
    forces = model.forces(grid.time, grid.strain, grid.temperature)
    if adjoint:
        states = nonlinear.solve_adjoint(solver, y0, grid.n_steps, *forces)
        if report.n_failed:
            # A failed specimen's state is NaN, but flow rules gated on ``f > 0`` would give
            # some of its parameters zero gradients: make every one of them NaN instead.
            poison = torch.where(report.failed, torch.nan, 0.0)
            for value in p.values():
                if value.requires_grad:
                    states = states + (poison * value)[None, :, None]
    else:
        with torch.no_grad():
            states = nonlinear.solve(solver, y0, grid.n_steps, *forces)
    if not stages:
        states = states[..., (n_stages - 1) * model.n_state:]
    return states, report


def integrate_unrolled(model: MaterialModel, params: Mapping[str, torch.Tensor | float],
                       grid: Grid, options: SolverOptions = SolverOptions()) -> torch.Tensor:
    """Reference: one step at a time of ``options.scheme``, plain autograd through every
    Newton iteration (memory linear in the number of steps). For tests and benchmarks.
    Returns end-of-step states ``(step, batch, n_state)``."""
    batch = grid.time.shape[1]
    factory = StrainControlledResidual(model, broadcast_params(model, params, batch, grid.time),
                                       options.scheme)
    n_stages = model.stages(options.scheme)
    x = torch.zeros(batch, n_stages * model.n_state, dtype=grid.time.dtype,
                    device=grid.time.device)
    states = [x]
    for k in range(1, grid.n_steps):
        window_t, window_e = grid.time[k - 1 : k + 1, :, None], grid.strain[k - 1 : k + 1, :, None]
        prev, y = x, x
        for _ in range(options.max_iterations):
            R, J = factory.evaluate_raw(torch.stack([prev, y]), (window_t, window_e))
            norm = R[0].norm(dim=-1)
            if bool((norm <= options.atol).all()):
                break
            y = y - torch.linalg.solve(J.diag[0], R[0])
        x = y
        states.append(x)
    return torch.stack(states)[..., (n_stages - 1) * model.n_state:]


def _recorded_stress(model: Integrable, params, time, strain, temperature, substeps,
                     options: SolverOptions) -> tuple[torch.Tensor, SolveReport]:
    """Stress ``(n_rec, batch)`` at the recorded points, without gradients."""
    grid = refine(time, strain, substeps, temperature)
    states, _, report = solve_recorded(model, params, grid, options, adjoint=False)
    return model.stress(states), report


@dataclass(frozen=True)
class SubstepPlan:
    """Integration steps per recorded interval and the stress error they were judged by.

    ``error`` ``(n_rec, batch)`` is the step-doubling estimate of the error of the grid
    ``substeps`` at the recorded points (MPa; ``nan`` where a solve failed), ``rounds`` the
    refinement rounds taken."""

    substeps: torch.Tensor
    error: torch.Tensor
    rounds: int


def estimate_error(model: Integrable, params, time, strain, substeps: torch.Tensor,
                   options: SolverOptions, temperature=None, mask=None
                   ) -> torch.Tensor:
    """Step-doubling estimate of the stress error ``(n_rec, batch)`` (MPa) of the grid
    ``substeps`` at the recorded points: the difference to a grid twice as fine, times
    ``2^p / (2^p - 1)`` for a scheme of order ``p`` (Richardson). Zero where ``mask`` is
    False, ``nan`` from where either solve failed."""
    order = model.order(options.scheme)
    coarse, report_c = _recorded_stress(model, params, time, strain, temperature, substeps,
                                        options)
    fine, report_f = _recorded_stress(model, params, time, strain, temperature, 2 * substeps,
                                      options)
    # a failed solve is NaN from its failed chunk on
    error = (coarse - fine).abs() * (2**order / (2**order - 1))
    return error if mask is None else torch.where(mask, error, 0.0)


#: Refinement rounds of :func:`plan_substeps` at the most.
PLAN_ROUNDS = 8

#: The lowest order of a scheme whose steps :func:`plan_substeps` lets span several recorded
#: intervals. A first-order scheme (backward Euler, NEML2's own) interpolates the points
#: inside a step linearly, and its step-doubling estimate missed that error: with spans,
#: backward Euler planned at 0.5 MPa on perzyna-voce's path (``benchmarks/accuracy.py``)
#: took 852 steps and was 1.29 MPa off at worst, against 419 steps and 0.362 MPa without.
#: It needs several steps an interval anyway.
MIN_SPAN_ORDER = 2


def plan_substeps(model: Integrable, params: Mapping[str, torch.Tensor | float],
                  time: torch.Tensor, strain: torch.Tensor, options: SolverOptions,
                  temperature: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                  reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> SubstepPlan:
    """Integration steps per recorded interval, shared by the batch, so that the estimated
    stress error (:func:`estimate_error`) stays below ``options.tolerance`` at every
    recorded point of every path (``(n_rec, batch)``, padded points masked out).

    Starts from one step per interval (four where the strain rate changes, and one over
    up to ``options.max_span`` intervals where every path is straight:
    :func:`initial_substeps`) and refines, a few rounds, the intervals over which some
    path's estimated error grew by more than a share of the tolerance (a step over several
    intervals by the largest growth among them, split in halves or into whole steps): by
    the factor that the scheme's order says brings that growth under it. Errors in stiff
    viscoplasticity are mostly local (relaxation damps what came before), so the growth
    over an interval is its own contribution; where the total still exceeds the tolerance
    once no interval stands out, the share is halved. Where a path's solve fails (Newton
    fails on steps too long for a stiff flow rule), the interval of the failure is refined
    eightfold; a failure that refining does not cure is left to the solve that uses the
    plan to report. With ``options.substeps`` set the counts are fixed and only the
    estimate is made.

    ``reduce_max`` (the elementwise maximum over ranks, when the paths are split over
    several processes, each holding whole paths of the same length) makes every decision
    from every rank's paths: where the strain rate changes, and each round's largest
    error, failure flag and growth per interval are all that the decisions read, so every
    rank plans the grid that one process planning all paths would. ``error`` is then this
    rank's paths' estimate.
    """
    changes = rate_changes(time, strain)
    if reduce_max is not None:  # where any rank's paths change rate
        changes = reduce_max(changes.to(time.dtype)) > 0
    if not options.automatic:
        substeps = fixed_substeps(time, strain, options, changes)
        error = estimate_error(model, params, time, strain, substeps, options, temperature, mask)
        return SubstepPlan(substeps, error, 0)
    joins = linear_joins(time, strain, temperature)
    if reduce_max is not None:  # joined only where every rank's paths are straight
        joins = reduce_max((~joins).to(time.dtype)) == 0
    order = model.order(options.scheme)
    tol = options.tolerance
    # a first-order scheme never spans (MIN_SPAN_ORDER)
    max_span = options.max_span if order >= MIN_SPAN_ORDER else 1
    substeps = initial_substeps(changes, joins, max_span)
    share = 0.5
    for rounds in range(1, PLAN_ROUNDS + 1):
        error = estimate_error(model, params, time, strain, substeps, options, temperature, mask)
        # Newton can fail on steps too long for a stiff flow rule: the interval where a path
        # first fails is refined like one far over the tolerance
        failed = torch.isnan(error)
        first = failed & (torch.cumsum(failed.long(), dim=0) == 1)
        judged = torch.where(failed, 0.0, error)
        growth = (judged[1:] - judged[:-1]).clamp_min(0)
        growth = torch.where(first[1:], 8.0**order * share * tol, growth).amax(dim=-1)
        summary = torch.cat([growth, judged.max()[None], failed.any()[None].to(growth.dtype)])
        if reduce_max is not None:
            summary = reduce_max(summary)
        growth, worst, any_failed = summary[:-2], float(summary[-2]), bool(summary[-1] > 0)
        if worst <= tol and not any_failed:
            return SubstepPlan(substeps, error, rounds)
        growth = _per_step(growth, substeps)  # a step over several intervals splits whole
        over = growth > share * tol
        if not over.any():
            share /= 2
            continue
        factor = (growth / (share * tol)).clamp(max=2.0**20) ** (1.0 / order)
        factor = torch.ceil(1.2 * factor).clamp(2, 16)
        grown = torch.where(over, _finer(substeps, factor), substeps)
        grown = grown.clamp(max=options.max_substeps)
        if torch.equal(grown, substeps):
            break  # every interval that matters is at max_substeps
        substeps = grown
    error = estimate_error(model, params, time, strain, substeps, options, temperature, mask)
    return SubstepPlan(substeps, error, PLAN_ROUNDS + 1)


def initial_substeps(changes: torch.Tensor, joins: torch.Tensor, max_span: int) -> torch.Tensor:
    """:func:`plan_substeps`' start: four steps in an interval where the strain rate changes,
    one elsewhere, and one step over runs of up to ``max_span`` joined intervals
    (:func:`linear_joins`; groups of a power of two, from the start of each run)."""
    changed, joined = changes.tolist(), joins.tolist()
    values = [4.0 if c else 1.0 for c in changed]
    i = 0
    while i < len(values):
        if changed[i]:
            i += 1
            continue
        end = i + 1
        while end < len(values) and joined[end] and not changed[end]:
            end += 1
        while i < end:
            k = 1
            while 2 * k <= min(max_span, end - i):
                k *= 2
            values[i:i + k] = [1.0 / k] * k
            i += k
    return torch.tensor(values, dtype=torch.float64, device=changes.device)


def _per_step(growth: torch.Tensor, substeps: torch.Tensor) -> torch.Tensor:
    """Each interval's ``growth`` replaced by the largest over the intervals its step spans."""
    out = growth.clone()
    for first, intervals, _ in spans(substeps):
        if intervals > 1:
            out[first:first + intervals] = growth[first:first + intervals].max()
    return out


def _finer(substeps: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``substeps`` with each interval's steps multiplied by ``factor`` (at least 2): a step
    over ``k`` intervals splits into ``k / 2^j`` intervals a step, or whole steps per
    interval once the factor reaches ``k``."""
    merged = substeps < 1
    power = torch.exp2(torch.ceil(torch.log2(factor)))
    split = substeps * power
    whole = torch.ceil(substeps * factor)
    return torch.where(merged, torch.where(split < 1, split, whole.clamp_min(1)),
                       substeps * factor)


def simulate(model: Integrable, params: Mapping[str, torch.Tensor | float],
             time: torch.Tensor, strain: torch.Tensor, options: SolverOptions = SolverOptions(),
             adjoint: bool = True, temperature: torch.Tensor | None = None,
             substeps: torch.Tensor | None = None) -> tuple[torch.Tensor, SolveReport]:
    """Stress ``(n_rec, batch)`` at the recorded points of ``time``/``strain`` (and
    ``temperature``) ``(n_rec, batch)``.

    ``substeps`` (``n_rec - 1``,) fixes the steps per recorded interval; by default they are
    the options' fixed counts, or planned (:func:`plan_substeps`) at ``params``."""
    if substeps is None:
        if options.automatic:
            plain = {k: torch.as_tensor(v).detach() for k, v in params.items()}
            substeps = plan_substeps(model, plain, time, strain, options, temperature).substeps
        else:
            substeps = fixed_substeps(time, strain, options)
    grid = refine(time, strain, substeps, temperature)
    states, _, report = solve_recorded(model, params, grid, options, adjoint=adjoint)
    return model.stress(states), report
