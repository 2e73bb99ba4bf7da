"""The model's latent sites packed into one unconstrained vector, and the moves on it.

Every method works on this vector: Newton for the MAP, the whitened Gaussian guides, NUTS.
Site names are built here and nowhere else (:func:`latent_names`), as is the one map from the
non-centered to the centered layout (:func:`to_centered`).

The layout is that of a Pyro ``AutoContinuous`` guide (sites in the order the model samples
them, each flattened after its ``biject_to`` transform), but it is built from a public
``poutine.trace`` of the model, so that no Pyro internals are involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to

from bayescal.hierarchy import Hierarchy, Solving

#: The model's observed site (or, on several ranks, its factor).
OBSERVED = "stress"


def latent_names(h: Hierarchy) -> list[str]:
    """The model's latent sample sites."""
    names = [f"{name}_z" for name in h.spec.shared]
    for name in h.spec.varying:
        names += [f"{name}_pop_z", f"{name}_cv", specimen_site(h, name)]
    return names + ["noise_sd"]


def specimen_site(h: Hierarchy, name: str) -> str:
    """The site holding a varying parameter's specimen values: its values in z (centered)
    or its offsets (non-centered)."""
    return f"{name}_z" if name in h.centered else f"{name}_offset"


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
            continue
        values[f"{name}_pop_z"] = z
        values[f"{name}_cv"] = torch.tensor(p.spread / 2, dtype=torch.float64)
        shape = (h.experiments.n_specimens,)
        if name in h.centered:
            values[f"{name}_z"] = z.expand(shape).clone()
        else:
            values[f"{name}_offset"] = torch.zeros(shape, dtype=torch.float64)
    values["noise_sd"] = torch.tensor(h.spec.noise_prior_scale / 2, dtype=torch.float64)
    return values


@dataclass(frozen=True)
class Site:
    """One latent site of the packed vector: where it sits, its shape and its support."""

    name: str
    start: int
    shape: torch.Size
    support: object

    @property
    def stop(self) -> int:
        return self.start + self.shape.numel()


class Packing:
    """The model's latent sites packed into one unconstrained vector, and the log joint
    density as a function of it. ``u0`` packs ``values`` (e.g. :func:`initial_values`)."""

    def __init__(self, h: Hierarchy, values: dict[str, torch.Tensor]) -> None:
        self.h = h
        names = latent_names(h)
        missing = sorted(set(names) - set(values))
        if missing:
            raise ValueError(f"no starting value for latent site(s) {', '.join(missing)}")
        with torch.no_grad(), poutine.condition(data={k: values[k] for k in names}):
            trace = poutine.trace(h.sample_latents).get_trace()
        sites, free, start = [], [], 0
        for name in (n for n in trace.nodes if n in names):  # in the order sampled
            node = trace.nodes[name]
            support = node["fn"].support
            value = torch.as_tensor(node["value"], dtype=torch.float64)
            sites.append(Site(name, start, value.shape, support))
            free.append(biject_to(support).inv(value).reshape(-1))
            start += value.numel()
        self.sites = tuple(sites)
        self.u0 = torch.cat(free).detach()

    @property
    def dim(self) -> int:
        return self.u0.numel()

    def slices(self) -> dict[str, slice]:
        """Where each site sits in the packed vector."""
        return {site.name: slice(site.start, site.stop) for site in self.sites}

    def specimen_indices(self) -> torch.Tensor:
        """Positions of the specimen-level values, ``(kinds, specimens)``: one row per
        varying parameter (its offsets, or its values when centered)."""
        where = self.slices()
        rows = [torch.arange(where[specimen_site(self.h, name)].start,
                             where[specimen_site(self.h, name)].stop)
                for name in self.h.spec.varying]
        return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.long)

    def likelihood_globals(self) -> torch.Tensor:
        """Positions of the global coordinates the likelihood sees: the shared values and
        the noise (the specimen values are :meth:`specimen_indices`)."""
        where = self.slices()
        names = [f"{name}_z" for name in self.h.spec.shared] + ["noise_sd"]
        return torch.cat([torch.arange(where[n].start, where[n].stop) for n in names])

    def likelihood_coordinates(self, u: torch.Tensor) -> torch.Tensor:
        """What the likelihood sees, for rows of ``u`` (B, dim): every specimen's value in z,
        the shared values in z and the noise sd (unconstrained)."""
        h, where = self.h, self.slices()
        parts = [u[:, where[f"{name}_z"]] for name in h.spec.shared]
        for name in h.spec.varying:
            if name in h.centered:
                parts.append(u[:, where[f"{name}_z"]])
                continue
            pop = u[:, where[f"{name}_pop_z"]]
            tau = h.specimen_scale(name, pop, u[:, where[f"{name}_cv"]].exp())
            parts.append(pop + tau * u[:, where[f"{name}_offset"]])
        return torch.cat(parts + [u[:, where["noise_sd"]]], -1)

    def recentre(self, u: torch.Tensor) -> torch.Tensor:
        """Move each non-centered parameter's population location to the mean of its
        specimens (in z), keeping every specimen's value, and so the likelihood, unchanged: an exact
        move along the valley of the non-centered parameterisation, where gradient steps
        creep. Rows of ``u`` (B, dim) are moved independently."""
        h, where = self.h, self.slices()
        u = u.clone()
        for name in h.non_centered:
            pop, offset = where[f"{name}_pop_z"], where[f"{name}_offset"]
            cv = u[:, where[f"{name}_cv"]].exp()
            z = u[:, pop] + h.specimen_scale(name, u[:, pop], cv) * u[:, offset]
            centre = z.mean(-1, keepdim=True)
            u[:, pop] = centre
            u[:, offset] = (z - centre) / h.specimen_scale(name, centre, cv)
        return u

    def spread_at_specimens(self, u: torch.Tensor, joint: bool = False) -> torch.Tensor:
        """:meth:`recentre`, then each coefficient of variation moved to the mode of its
        density given the specimens' values in the centered form with the population
        location integrated out (flat), ``HalfNormal(cv; spread) tau^-(n-1)
        exp(-S2 / (2 tau^2))``, keeping every specimen's value (offsets rescaled).

        The joint mode in the non-centered coordinates lacks the ``tau^-n`` volume factor
        and overstates the spread: ``cv^2 = spread * sqrt(sum (z_i - z_pop)^2) / k``, well
        above the specimens' own coefficient of variation, and SVI started there does not
        leave it. Closed form: with ``tau = k cv`` and ``S2 = sum (z_i - mean z)^2``,
        ``m = n - 1`` (the location integrated out takes one degree of freedom),
        ``cv^2 = spread^2 (sqrt(m^2 + 4 S2 / (k spread)^2) - m) / 2``. The population bands
        this gives are checked in ``tests/test_predict.py``.

        With ``joint``, each cv goes instead to its conditional mode in the non-centered
        joint density itself, the one Newton maximises: ``HalfNormal(cv; spread) cv
        exp(-S2 / (2 tau^2))`` (the ``cv`` from the log transform), ``m = -1`` in the same
        formula. That is an exact move along the funnel between a spread and its offsets,
        where the Hessian has negative curvature near the mode and Newton steps crept (the
        line search tries it: the 304L MAP took 18 iterations instead of 30).
        """
        h, where = self.h, self.slices()
        u = self.recentre(u)
        m = -1 if joint else h.experiments.n_specimens - 1
        for name in h.non_centered:
            pop, offset, cv_at = where[f"{name}_pop_z"], where[f"{name}_offset"], where[f"{name}_cv"]
            spread = h.spec.parameters[name].spread
            k = h.specimen_scale(name, u[:, pop], torch.ones_like(u[:, pop]))
            z_dev = h.specimen_scale(name, u[:, pop], u[:, cv_at].exp()) * u[:, offset]
            s2 = (z_dev**2).sum(-1, keepdim=True)
            cv2 = spread**2 * ((m**2 + 4 * s2 / (k * spread) ** 2).sqrt() - m) / 2
            cv = cv2.clamp_min(1e-12).sqrt()
            u[:, cv_at] = cv.log()
            u[:, offset] = z_dev / (k * cv)
        return u

    def pack(self, latents: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rows of the packed vector (draw, dim) for latent draws with a leading draw
        dimension (as :func:`~bayescal.inference.draws.sample_guide` gives them): the
        inverse of :meth:`constrain`."""
        n = latents["noise_sd"].shape[0]
        return torch.cat([biject_to(site.support).inv(
            latents[site.name].reshape(n, -1).to(torch.float64)) for site in self.sites], -1)

    def unpack(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of ``u`` (B, dim) split into the sites' unconstrained values ``(B, *shape)``."""
        return {site.name: u[:, site.start:site.stop].reshape(u.shape[0], *site.shape)
                for site in self.sites}

    def constrain(self, u: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Site values for a batch ``u`` (B, dim), shaped ``(B, size)`` for a draws plate at
        dim -2, and the log |det| of the unconstraining transforms per row."""
        batch = u.shape[0]
        values, logdet = {}, torch.zeros(batch, dtype=u.dtype)
        for site in self.sites:
            free = u[:, site.start:site.stop]
            transform = biject_to(site.support)
            value = transform(free)
            logdet = logdet + transform.log_abs_det_jacobian(free, value).reshape(batch, -1).sum(-1)
            values[site.name] = value
        return values, logdet

    def log_joint(self, u: torch.Tensor, solving: Solving | None = None) -> torch.Tensor:
        """Log joint density in the unconstrained space for each row of ``u`` (B, dim); the
        solves as ``solving`` asks (:class:`~bayescal.hierarchy.Solving`)."""
        prior, likelihood = self._log_density(u, solving=solving)
        return prior + likelihood

    def log_prior(self, u: torch.Tensor) -> torch.Tensor:
        """The prior part of :meth:`log_joint` (with the unconstraining Jacobian) for each
        row of ``u`` (B, dim): no solve."""
        return self._log_density(u, observed=False)[0]

    def log_likelihood(self, u: torch.Tensor, solving: Solving | None = None) -> torch.Tensor:
        """The likelihood part of :meth:`log_joint` (the observed stress) for each row of
        ``u`` (B, dim)."""
        return self._log_density(u, solving=solving)[1]

    def _log_density(self, u: torch.Tensor, solving: Solving | None = None,
                     observed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The model traced at each row of ``u`` (only its latent part, no solve, unless
        ``observed``): the prior terms with the unconstraining Jacobian, and the observed
        stress's term (zero unless ``observed``)."""
        batch = u.shape[0]
        values, logdet = self.constrain(u)
        with pyro.plate("draws", batch, dim=-2), poutine.condition(data=values):
            if observed:
                trace = poutine.trace(self.h).get_trace(solving=solving)
            else:
                trace = poutine.trace(self.h.sample_latents).get_trace()
        trace.compute_log_prob()
        prior, likelihood = logdet, torch.zeros_like(logdet)
        for site in trace.nodes.values():
            if site["type"] == "sample" and site["name"] != "specimen":
                term = site["log_prob"].reshape(batch, -1).sum(-1)
                if site["name"] == OBSERVED:
                    likelihood = likelihood + term
                else:
                    prior = prior + term
        return prior, likelihood

    def point(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Constrained site values for a single unconstrained vector."""
        values, _ = self.constrain(u[None])
        return {site.name: values[site.name].reshape(site.shape).detach() for site in self.sites}


def to_centered(packing: Packing, u: torch.Tensor,
                names: Iterable[str] | None = None) -> torch.Tensor:
    """Rows of ``u`` (B, dim) of a packing in the non-centered layout moved to the layout
    where ``names`` (default: every varying parameter) are centered: each of their specimen
    offsets replaced by the specimen's value in z (same positions in the vector)."""
    h, where = packing.h, packing.slices()
    out = u.clone()
    for name in (h.spec.varying if names is None else names):
        pop, offset = u[:, where[f"{name}_pop_z"]], where[f"{name}_offset"]
        tau = h.specimen_scale(name, pop, u[:, where[f"{name}_cv"]].exp())
        out[:, offset] = pop + tau * u[:, offset]
    return out


def to_centered_jacobian(packing: Packing, u: torch.Tensor,
                         names: Iterable[str] | None = None) -> torch.Tensor:
    """The Jacobian ``d to_centered(u) / du`` (dim, dim) at one point ``u`` (dim,), exact,
    from one batch of directional derivatives.

    A specimen's value in z depends on its own offset and on its population's location and
    spread only, so one derivative per coordinate that is no offset and one per kind of
    offset (all of a kind's offsets moved together: each moves its own row alone) give every
    column; column by column (a backward pass per row of the Jacobian, hundreds for a
    64-specimen set) this cost about a tenth of a MAP fit, on every rank.
    """
    h, where = packing.h, packing.slices()
    dim = u.numel()
    kinds = [torch.arange(dim)[where[f"{name}_offset"]]
             for name in (h.spec.varying if names is None else names)]
    is_offset = torch.zeros(dim, dtype=torch.bool)
    for index in kinds:
        is_offset[index] = True
    others = (~is_offset).nonzero().flatten()
    directions = torch.zeros(len(others) + len(kinds), dim, dtype=u.dtype)
    directions[torch.arange(len(others)), others] = 1.0
    for k, index in enumerate(kinds):
        directions[len(others) + k, index] = 1.0
    # rows are mapped one by one: row i's derivative along direction i is J @ d_i
    rows = u.detach().expand_as(directions).contiguous()
    _, moved = torch.autograd.functional.jvp(lambda r: to_centered(packing, r, names), rows,
                                             directions)
    jacobian = torch.zeros(dim, dim, dtype=u.dtype)
    jacobian[:, others] = moved[:len(others)].T
    for k, index in enumerate(kinds):
        jacobian[index, index] = moved[len(others) + k, index]
    return jacobian


def congruence(jacobian: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``jacobian.T @ matrix @ jacobian`` for square ``(dim, dim)`` tensors, in ``dim^2``
    operations per column of ``jacobian`` that has entries off its diagonal, not ``dim^3``.

    The centring map's Jacobian (:func:`to_centered_jacobian`) is such a matrix: a
    specimen's value moves with its own offset (a diagonal entry) and with its
    population's location and spread (a few full columns). Two dense products of the
    MAP's Hessian took 0.11 s a Newton iteration for 256 specimens (dim 778) and grow with
    ``dim^3``; every rank makes them, so they set a floor under a sharded fit
    (benchmarks/README.md, scale)."""
    diagonal = jacobian.diagonal()
    full = (jacobian - torch.diag(diagonal)).ne(0).any(0).nonzero().flatten()
    if 4 * full.numel() > jacobian.shape[1]:  # hardly sparser than dense
        return jacobian.T @ matrix @ jacobian
    right = matrix * diagonal  # matrix @ jacobian, column by column
    right[:, full] = matrix @ jacobian[:, full]
    out = diagonal[:, None] * right  # jacobian.T @ right, row by row
    out[full] = jacobian[:, full].T @ right
    return out


def from_centered(packing: Packing, w: torch.Tensor,
                  names: Iterable[str] | None = None) -> torch.Tensor:
    """The inverse of :func:`to_centered`: rows of ``w`` (B, dim) in the layout where
    ``names`` are centered moved back to the packing's, each specimen's value in z replaced
    by its offset from the population location (differentiable)."""
    h, where = packing.h, packing.slices()
    out = w.clone()
    for name in (h.spec.varying if names is None else names):
        pop, at = w[:, where[f"{name}_pop_z"]], where[f"{name}_offset"]
        tau = h.specimen_scale(name, pop, w[:, where[f"{name}_cv"]].exp())
        out[:, at] = (w[:, at] - pop) / tau
    return out
