"""The hierarchical Pyro model: population -> specimen parameters -> simulate -> likelihood.

Each calibrated parameter lives in an unconstrained space through a smooth bijection onto its
bounds, ``P = lo + (hi - lo) * sigmoid(z)``. For a parameter that varies by specimen:

* population location ``z_pop ~ Normal(z(centre), sd / P'(z(centre)))`` (the card's prior on
  the population mean, matched at its centre),
* coefficient of variation ``cv ~ HalfNormal(spread)``, giving a scale in z of
  ``tau = cv * P(z_pop) / P'(z_pop)``,
* specimen values ``z_i = z_pop + tau * offset_i`` with ``offset_i ~ Normal(0, 1)``
  (non-centered, the default) or ``z_i ~ Normal(z_pop, tau)`` (centered), chosen per
  parameter.

A shared parameter has one ``z ~ Normal(z(centre), sd / P'(z(centre)))``. Measurement noise
``noise_sd ~ HalfNormal(prior_scale)``; stress ~ Normal(simulated stress, noise_sd) at the
recorded points, masked where padded. The population mean and sd in physical units
(``P_pop_mean``, ``P_pop_sd``) are moments of the logistic-normal population, computed by
Gauss-Hermite quadrature.

The model is a plain function of the data; it knows no file formats. It broadcasts over any
leading batch dimensions that Pyro adds (vectorised particles, predictive draws), so that all
draws and specimens go through one batched solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from bayescal.card import ModelSpec, load_model
from bayescal.data import Experiments
from bayescal.distributed import Communicator, Shard
from bayescal.material import Integrable
from bayescal.integrate import (SolverOptions, SolveReport, SubstepPlan, fixed_substeps,
                               plan_substeps, refine, solve_recorded)


class SolverFailure(RuntimeError):
    """The material model could not be integrated for some specimens of a batch.

    Pyro's trace handler re-raises an exception as ``type(exc)(message + its shapes)``, so a
    message alone is accepted too (then ``report`` is None).
    """

    def __init__(self, report: SolveReport | str) -> None:
        if isinstance(report, str):
            super().__init__(report)
            self.report = None
            return
        super().__init__(f"the solver failed for {report.n_failed} of "
                         f"{report.failed.numel()} simulated specimens")
        self.report = report


def centered_names(spec: ModelSpec, centered: bool | Iterable[str]) -> frozenset[str]:
    """The varying parameters to sample centered: all (``True``), none (``False``) or those
    named, each of which must vary by specimen."""
    if centered is True or centered is False:
        return frozenset(spec.varying) if centered else frozenset()
    names = frozenset(centered)
    unknown = sorted(names - set(spec.varying))
    if unknown:
        raise ValueError(f"centered: {', '.join(unknown)} do(es) not vary by specimen "
                         f"(varying: {', '.join(spec.varying) or 'none'})")
    return names


@dataclass(frozen=True)
class Bounded:
    """Smooth bijection from the real line onto ``(lo, hi)``."""

    lo: float
    hi: float

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * torch.sigmoid(z)

    def inverse(self, value) -> torch.Tensor:
        u = (torch.as_tensor(value, dtype=torch.float64) - self.lo) / (self.hi - self.lo)
        return torch.logit(u.clamp(1e-12, 1 - 1e-12))

    def slope(self, z: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(z)
        return (self.hi - self.lo) * s * (1 - s)


_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(32)


def population_moments(transform: Bounded, z_pop: torch.Tensor, tau: torch.Tensor):
    """Mean and sd of ``transform(z_pop + tau * N(0, 1))`` by Gauss-Hermite quadrature."""
    nodes = torch.as_tensor(_GH_NODES, dtype=z_pop.dtype, device=z_pop.device)
    weights = torch.as_tensor(_GH_WEIGHTS / math.sqrt(2 * math.pi), dtype=z_pop.dtype,
                              device=z_pop.device)
    values = transform.forward(z_pop[..., None] + tau[..., None] * nodes)
    mean = (weights * values).sum(-1)
    var = (weights * (values - mean[..., None]) ** 2).sum(-1)
    return mean, var.clamp_min(0).sqrt()


@dataclass
class Solving:
    """How a caller wants the model's solves done, and what they reported; owned by the
    caller and passed to the model (``h(solving=...)``), so that a :class:`Hierarchy` holds
    no state that changes with a call.

    ``strict``: a failed solve raises :class:`SolverFailure` (else its specimens' stress is
    NaN, which makes the density -inf or NaN). ``warm_start``: each solve starts Newton from
    the previous solve's trajectory (``previous``) when the batch has the same size (NUTS's
    successive leapfrog points differ little; SVI's particles change every step, where a
    stale start costs more Newton iterations than it saves). ``reports`` collects every
    solve's report.
    """

    strict: bool = True
    warm_start: bool = False
    previous: torch.Tensor | None = None
    reports: list[SolveReport] = field(default_factory=list)

    @property
    def retries(self) -> int:
        """Solver retries (chunks re-solved with more steps) over all reported solves."""
        return sum(report.retries for report in self.reports)


class Hierarchy:
    """A card turned into the Pyro model for one set of experiments.

    Call the instance as the Pyro model. ``observed=False`` leaves stress unobserved (for
    simulation and posterior-predictive draws); ``solving`` (:class:`Solving`) says how to
    solve and collects the reports. ``compile`` (default: the card's) compiles a NEML2 model
    (:func:`~bayescal.card.load_model`).

    ``centered`` names the varying parameters whose specimen values are sampled centered
    (``True``: all of them, ``False``: none); ``self.centered`` is that set.

    ``substeps`` (integration steps per recorded interval) fixes the grid; by default it is
    the options' fixed counts, or planned from their tolerance over the prior population
    (:func:`plan_integration`). Nothing about the instance changes after construction.

    ``comm`` (:class:`~bayescal.distributed.Communicator`), when the fit runs on several
    ranks: this rank solves only its shard of the specimens (``self.shard``, balanced by
    integration steps), on the shard's own grid (``self.local``, ``self.local_grid``:
    trimmed to the shard's longest specimen), and the likelihood and solve reports are
    summed over ranks (:mod:`bayescal.distributed`), so that every rank sees the same model.
    Without it (one process) nothing of that runs.
    """

    def __init__(self, spec: ModelSpec, experiments: Experiments,
                 options: SolverOptions | None = None,
                 centered: bool | Iterable[str] = False,
                 compile: bool | None = None, substeps: torch.Tensor | None = None,
                 comm: Communicator | None = None) -> None:
        self.spec = spec
        self.model: Integrable = load_model(spec, compile)
        self.experiments = experiments
        self.options = options or spec.solver
        self.centered = centered_names(spec, centered)
        self.transforms = {name: Bounded(*spec.parameters[name].bounds) for name in spec.calibrated}
        if substeps is None and self.options.automatic:
            substeps = plan_integration(spec, self.model, experiments, self.options,
                                        comm=comm).substeps
        elif substeps is None:
            substeps = fixed_substeps(experiments.time, experiments.strain, self.options)
        self.substeps = substeps
        self.grid = refine(experiments.time, experiments.strain, substeps,
                           experiments.temperature)
        self.comm = comm
        self.shard: Shard | None = None
        if comm is not None:
            # a specimen costs the integration steps up to its last recorded point
            costs = [int(self.grid.recorded[n - 1]) + 1 for n in experiments.n_points]
            self.shard = comm.shard(costs)
            self.local = experiments.select([experiments.specimens[j]
                                             for j in self.shard.index.tolist()])
            self.local_grid = refine(self.local.time, self.local.strain,
                                     substeps[:self.local.n_steps - 1], self.local.temperature)

    @property
    def non_centered(self) -> tuple[str, ...]:
        """The varying parameters sampled non-centered (through offsets)."""
        return tuple(name for name in self.spec.varying if name not in self.centered)

    def with_grid(self, substeps: torch.Tensor,
                  centered: bool | Iterable[str] | None = None) -> "Hierarchy":
        """The same model and data on another integration grid (and parameterisation)."""
        return Hierarchy(self.spec, self.experiments, self.options,
                         self.centered if centered is None else centered, substeps=substeps,
                         comm=self.comm)

    # -- priors -----------------------------------------------------------------------
    def prior_z(self, name: str) -> dist.Normal:
        """Normal prior in z for a population location (or a shared value)."""
        p = self.spec.parameters[name]
        t = self.transforms[name]
        centre, sd = p.prior
        z0 = t.inverse(centre)
        return dist.Normal(z0, sd / t.slope(z0))

    def specimen_scale(self, name: str, z_pop: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
        """Scale in z of the specimen distribution for a coefficient of variation ``cv``."""
        t = self.transforms[name]
        return cv * t.forward(z_pop) / t.slope(z_pop)

    # -- the model --------------------------------------------------------------------
    def specimen_plate(self) -> pyro.plate:
        return pyro.plate("specimen", self.experiments.n_specimens, dim=-1)

    def sample_parameters(self, plate: pyro.plate) -> dict[str, torch.Tensor]:
        """Sample every parameter; returns physical values.

        Global sites have shape ``()`` or, under Pyro's vectorised plates, ``(..., 1)``: either
        way they broadcast against the specimen plate at dim -1.
        """
        values: dict[str, torch.Tensor] = {}
        for name in self.spec.shared:
            z = pyro.sample(f"{name}_z", self.prior_z(name))
            values[name] = self.transforms[name].forward(z)
        pops = {}
        for name in self.spec.varying:
            z_pop = pyro.sample(f"{name}_pop_z", self.prior_z(name))
            cv = pyro.sample(f"{name}_cv", dist.HalfNormal(
                torch.tensor(self.spec.parameters[name].spread, dtype=torch.float64)))
            pops[name] = (z_pop, self.specimen_scale(name, z_pop, cv))
        with plate:
            for name, (z_pop, tau) in pops.items():
                if name in self.centered:
                    z = pyro.sample(f"{name}_z", dist.Normal(z_pop, tau))
                else:
                    offset = pyro.sample(f"{name}_offset", dist.Normal(
                        torch.zeros((), dtype=torch.float64), 1.0))
                    z = z_pop + tau * offset
                values[name] = self.transforms[name].forward(z)
        return values

    def sample_noise(self) -> torch.Tensor:
        return pyro.sample("noise_sd", dist.HalfNormal(
            torch.tensor(self.spec.noise_prior_scale, dtype=torch.float64)))

    def sample_latents(self) -> dict[str, torch.Tensor]:
        """Every latent site, without solving: the model's prior part."""
        values = self.sample_parameters(self.specimen_plate())
        return {**values, "noise_sd": self.sample_noise()}

    def solve_stress(self, values: dict[str, torch.Tensor], adjoint: bool = True,
                     solving: Solving | None = None) -> tuple[torch.Tensor, SolveReport]:
        """Stress at recorded points, shape (..., specimen, step), for physical parameter values
        (batched over any leading dimensions), and the solve's report. A failed solve raises
        :class:`SolverFailure` when ``solving.strict`` (the default), else leaves NaN.

        On several ranks each solves its shard and the stress is gathered (every rank gets
        all of it, its gradient flowing back to the rank that solved it)."""
        if self.shard is not None:
            local, report = self._solve_shard(values, adjoint, solving)
            pad = self.experiments.n_steps - local.shape[-1]
            # padded steps repeat the last recorded point (zero increments): stress stays
            local = torch.cat([local, local[..., -1:].expand(*local.shape[:-1], pad)], -1)
            return self.shard.gather(local, dim=-2), report
        solving = solving if solving is not None else Solving()
        n_spec = self.experiments.n_specimens
        params = self._fixed()
        batch = torch.broadcast_shapes((n_spec,), *(v.shape for v in values.values()))
        flat = {name: v.expand(batch).reshape(-1) for name, v in values.items()}
        params.update(flat)
        return self._integrate(params, batch, self.grid, adjoint, solving)

    def _fixed(self) -> dict[str, torch.Tensor]:
        return {name: torch.as_tensor(p.value, dtype=torch.float64)
                for name, p in self.spec.parameters.items() if p.is_fixed}

    def _integrate(self, params: dict[str, torch.Tensor], batch: torch.Size, grid,
                   adjoint: bool, solving: Solving, agree=None,
                   options: SolverOptions | None = None) -> tuple[torch.Tensor, SolveReport]:
        """Solve the flat batch ``params`` (``batch`` flattened) on ``grid`` repeated over
        the leading dimensions; stress ``(*batch, step)``. ``agree(report)``, on several
        ranks, turns this rank's report into the job's (before a failure is raised, so
        that every rank raises alike). ``options``: the solver's (default: the
        hierarchy's)."""
        n_total = int(np.prod(batch))
        batched = grid.repeat(n_total // batch[-1])
        guess = solving.previous if solving.warm_start else None
        if guess is not None and guess.shape[1] != n_total:
            guess = None
        at_points, states, report = solve_recorded(self.model, params, batched,
                                                   options or self.options, adjoint=adjoint,
                                                   guess=guess)
        if agree is not None:
            report = agree(report, batch)
        solving.reports.append(report)
        if solving.warm_start and not report.n_failed:
            solving.previous = states.detach()
        if report.n_failed and solving.strict:
            raise SolverFailure(report)
        stress = self.model.stress(at_points)  # (step, n_total)
        return stress.T.reshape(*batch, -1), report

    def _solve_shard(self, values: dict[str, torch.Tensor], adjoint: bool = True,
                     solving: Solving | None = None) -> tuple[torch.Tensor, SolveReport]:
        """This rank's shard of :meth:`solve_stress`: stress ``(..., shard specimen, shard
        step)`` on the shard's grid; the report (failures, retries) is the whole job's."""
        solving = solving if solving is not None else Solving()
        shard = self.shard
        batch = torch.broadcast_shapes((shard.n,), *(v.shape for v in values.values()))
        # all values in one tensor: one all-reduce of their gradients, not one per value
        stacked = shard.copy_to_shard(torch.stack([v.expand(batch) for v in values.values()]),
                                      dim=-1)
        local = dict(zip(values, stacked.unbind(0)))
        local_batch = torch.Size((*batch[:-1], len(shard.index)))
        params = self._fixed()
        params.update({name: v.reshape(-1) for name, v in local.items()})
        # the chunk length of the whole job's batch, not of this rank's share: chunks of
        # another length converge to other bits, and the fit would follow other iterates
        # on another number of ranks (128 specimens: 40 MAP iterations on 1, 33 on 2)
        options = self.options.for_batch(int(np.prod(batch)))
        return self._integrate(params, local_batch, self.local_grid, adjoint, solving,
                               agree=lambda report, b: self._agree(report, b, batch),
                               options=options)

    def _agree(self, report: SolveReport, local_batch: torch.Size, batch: torch.Size
               ) -> SolveReport:
        """The job's report from this rank's: failed specimens of every shard (in the full
        batch's layout) and retries summed, in one all-reduce."""
        failed = report.failed.reshape(local_batch).to(torch.float64)
        full = failed.new_zeros(batch).index_copy(-1, self.shard.index, failed)
        summed = self.comm.all_reduce(torch.cat([full.reshape(-1),
                                                 torch.tensor([float(report.retries)])]))
        return SolveReport(retries=int(summed[-1]), failed=summed[:-1] > 0, extra=report.extra)

    def responses(self, latents: dict[str, torch.Tensor], solving: Solving | None = None):
        """Physical parameters and noise-free stress ``(draw, specimen, step)`` for a batch of
        latent draws (leading dim = draw), in one batched solve (no autograd; by default a
        failed specimen's stress is NaN)."""
        d = next(iter(latents.values())).shape[0]
        shaped = {k: v.reshape(d, 1) if v.dim() == 1 else v for k, v in latents.items()}
        with torch.no_grad(), pyro.plate("draws", d, dim=-2), poutine.condition(data=shaped):
            values = self.sample_parameters(self.specimen_plate())
            stress, _ = self.solve_stress(values, adjoint=False,
                                          solving=solving or Solving(strict=False))
        values = {k: v.squeeze(-1) if v.shape[-1] == 1 else v for k, v in values.items()}
        return values, stress

    def population(self, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every varying parameter's population: ``P_pop_mean`` and ``P_pop_sd`` (physical
        units), and ``P_pop_loc`` and ``P_pop_scale``, the logistic-normal's location and
        scale in z, which new specimens are drawn from (:mod:`bayescal.predict`)."""
        out = {}
        for name in self.spec.varying:
            z_pop, cv = latents[f"{name}_pop_z"], latents[f"{name}_cv"]
            tau = self.specimen_scale(name, z_pop, cv)
            mean, sd = population_moments(self.transforms[name], z_pop, tau)
            out[f"{name}_pop_mean"], out[f"{name}_pop_sd"] = mean, sd
            out[f"{name}_pop_loc"], out[f"{name}_pop_scale"] = z_pop, tau
        return out

    def __call__(self, observed: bool = True, solving: Solving | None = None):
        plate = self.specimen_plate()
        values = self.sample_parameters(plate)
        noise = self.sample_noise()
        if observed and self.shard is not None:
            self._sharded_likelihood(plate, values, noise, solving)
            return values
        stress, _ = self.solve_stress(values, solving=solving)
        exp = self.experiments
        obs = torch.nan_to_num(exp.stress.T) if observed else None
        # the noise per specimen, as on several ranks (_sharded_likelihood): its gradient
        # sums each specimen's share in the same order, so one process and several follow
        # the same Newton iterates to the last bit
        sd = noise.expand(torch.broadcast_shapes(noise.shape, stress.shape[:-1]))
        with plate:
            pyro.sample("stress", dist.Normal(stress, sd[..., None]).mask(exp.mask.T)
                        .to_event(1), obs=obs)
        return values


    def _sharded_likelihood(self, plate: pyro.plate, values: dict[str, torch.Tensor],
                            noise: torch.Tensor, solving: Solving | None) -> None:
        """The observed stress's log likelihood on several ranks: each rank's specimens'
        terms (the same expression as one process's), gathered per specimen over ranks and
        entered as the factor ``stress``. The noise enters the shard through
        ``copy_to_shard`` too, so that its gradient collects every shard's share."""
        shard, local = self.shard, self.local
        stress, _ = self._solve_shard(values, solving=solving)
        prefix = stress.shape[:-2]
        full_noise = noise.expand(torch.broadcast_shapes(noise.shape, (*prefix, shard.n)))
        sd = shard.copy_to_shard(full_noise, dim=-1)
        terms = dist.Normal(stress, sd[..., None]).mask(local.mask.T).to_event(1) \
            .log_prob(torch.nan_to_num(local.stress.T))
        with plate:
            pyro.factor("stress", shard.gather(terms, dim=-1))


def draw_specimens(spec: ModelSpec, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Draw ``n`` specimens' physical parameters from the card's prior population.

    The population sits at the prior centres with a coefficient of variation equal to each
    parameter's ``spread`` (logistic-normal within the bounds, as in the model); shared
    parameters take their prior centre and fixed ones their value.
    """
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for name, p in spec.parameters.items():
        if p.is_fixed:
            values[name] = torch.full((n,), p.value, dtype=torch.float64)
            continue
        t = Bounded(*p.bounds)
        z0 = t.inverse(p.prior[0])
        if p.varies == "shared":
            values[name] = t.forward(z0).expand(n).clone()
            continue
        tau = p.spread * t.forward(z0) / t.slope(z0)
        offsets = torch.randn(n, generator=generator, dtype=torch.float64)
        values[name] = t.forward(z0 + tau * offsets)
    return values


#: Draws from the prior population, per specimen, that :func:`plan_integration` plans over
#: besides the prior centre.
PLAN_DRAWS = 2


def plan_integration(spec: ModelSpec, model: Integrable, experiments: Experiments,
                     options: SolverOptions, values: dict[str, torch.Tensor] | None = None,
                     comm: Communicator | None = None) -> SubstepPlan:
    """Integration steps per recorded interval for ``experiments`` (:func:`plan_substeps`).

    ``values`` are physical parameters per specimen (``(n_specimens,)`` tensors, e.g. the
    MAP). By default each specimen's path is planned at the prior centre and at
    :data:`PLAN_DRAWS` draws from the card's prior population (seeded), so that the grid
    also serves specimens away from the centre: a higher-order scheme's error grows fast
    where its steps are too long for a relaxation (it overshoots into the elastic range).

    With ``comm`` (several ranks) each rank plans over its share of the specimens (balanced
    by recorded points: the grid that would balance integration steps is what is being
    planned) and the ranks agree on every decision (:func:`plan_substeps`'s
    ``reduce_max``): every rank gets the grid one process would plan, in about
    ``1 / world`` of the time; the plan's ``error`` is then this rank's paths'.
    """
    n = experiments.n_specimens
    if values is None:
        centre = {k: torch.full((n,), float(p.value if p.is_fixed else p.prior[0]),
                                dtype=torch.float64) for k, p in spec.parameters.items()}
        draws = draw_specimens(spec, n * PLAN_DRAWS, seed=0)
        values = {k: torch.cat([centre[k], draws[k]]) for k in centre}
    else:
        values = {**{k: torch.full((n,), float(p.value), dtype=torch.float64)
                     for k, p in spec.parameters.items() if p.is_fixed}, **values}
    reps = next(iter(values.values())).shape[0] // n
    exp = experiments
    columns = torch.arange(reps * n)  # path r * n + j: specimen j at the r-th parameter set
    if comm is not None:
        mine = comm.shard([float(m) for m in exp.n_points]).index
        columns = (torch.arange(reps)[:, None] * n + mine).flatten()
    paths = [take_columns(x, columns, reps)
             for x in (exp.time, exp.strain, exp.temperature, exp.mask)]
    return plan_substeps(
        model, take_columns({k: v.detach() for k, v in values.items()}, columns), *paths[:2],
        options, *paths[2:], reduce_max=None if comm is None else comm.all_reduce_max)


def take_columns(x, columns: torch.Tensor, reps: int = 1):
    """Columns ``columns`` of ``x``, specimens (or paths) along the last dimension, after
    repeating it ``reps`` times (column ``r * n + j``: specimen ``j`` at the ``r``-th
    parameter set): a ``(point, specimen)`` path, a dict of parameter tensors (scalars, shared
    by all, are kept as they are) or None."""
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: take_columns(v, columns, reps) if v.dim() else v for k, v in x.items()}
    return x.repeat(*([1] * (x.dim() - 1)), reps)[..., columns]

