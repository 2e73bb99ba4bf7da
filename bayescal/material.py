"""Built-in uniaxial viscoplastic models and their strain-controlled implicit residual.

A model is one small class: the rate of its internal state at fixed total strain and the
Jacobian of that rate (:meth:`MaterialModel.rate`). Everything else (the implicit
Runge-Kutta residual of any scheme in :mod:`bayescal.schemes`, its block Jacobian, pyzag's
chunked Newton and adjoint) is shared.
:class:`Integrable` is what the solver needs of any model, built-in or NEML2
(:mod:`bayescal.neml2_backend`).

The state vector of every built-in model is expressed in MPa (stress first), so a single
residual norm never mixes units.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Mapping, Sequence

import torch
from pyzag.nonlinear import ChunkOp, NonlinearFunctionOperatorFactory
from pyzag.ode import DenseODEWrapper

from bayescal.catalogue import CATALOGUE
from bayescal.schemes import SCHEMES

Params = Mapping[str, torch.Tensor]


def _stack(items: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack broadcastable tensors along a new last dimension."""
    return torch.stack(torch.broadcast_tensors(*items), dim=-1)


def _stack_jacobian(rows: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Stack a nested list of broadcastable tensors into (..., n, n): one broadcast and one
    stack for all entries (a Newton iteration evaluates this many times on small tensors,
    where every torch call costs more than its arithmetic)."""
    n = len(rows)
    entries = torch.broadcast_tensors(*[entry for row in rows for entry in row])
    return torch.stack(entries, dim=-1).unflatten(-1, (n, n))


class Integrable(ABC):
    """What :func:`bayescal.integrate.integrate` needs of a model: its ``name``, its
    ``parameters`` (scalar names, each given as a ``(batch,)`` tensor), a pyzag operator
    factory at given parameters, the driving forces of a grid, the initial state and the
    stress of a state.

    A model may carry several stage values per step (an implicit Runge-Kutta scheme):
    :meth:`stages` says how many, and the factory's state is then ``stages * n_state`` long,
    the last ``n_state`` entries being the state at the end of the step. A model with its
    own time discretisation (NEML2) has one stage and ignores ``scheme``."""

    name: str
    parameters: tuple[str, ...]

    @property
    @abstractmethod
    def n_state(self) -> int:
        """Length of the state vector."""

    @abstractmethod
    def factory(self, params: Params, scheme: str = "backward-euler"
                ) -> NonlinearFunctionOperatorFactory:
        """The pyzag operator factory of the discretised equations at ``params``."""

    def stages(self, scheme: str) -> int:
        """State values per step that the factory carries for ``scheme``."""
        return 1

    def order(self, scheme: str) -> int:
        """Order of accuracy of the discretisation under ``scheme`` (for error estimates)."""
        return 1

    def stage_times(self, scheme: str) -> tuple[float, ...]:
        """The times of the stage values within a step, as fractions of it (the last is 1:
        the end of the step); a recorded point inside a step is interpolated through them
        (:func:`bayescal.integrate.recorded_states`)."""
        return (1.0,)

    @abstractmethod
    def forces(self, time: torch.Tensor, strain: torch.Tensor,
               temperature: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """pyzag's driving forces, each ``(step, batch, n)``, for ``(step, batch)`` paths."""

    def initial_state(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The state at the first point: zero, ``(batch, n_state)``."""
        return torch.zeros(batch, self.n_state, dtype=like.dtype, device=like.device)

    @abstractmethod
    def stress(self, state: torch.Tensor) -> torch.Tensor:
        """Axial stress (MPa) from a state tensor ``(..., n_state)``."""

    @abstractmethod
    def dense_jacobian(self, jacobian) -> tuple[torch.Tensor, torch.Tensor]:
        """The diagonal and sub-diagonal blocks of a factory's block Jacobian as dense
        ``(step, batch, n_state, n_state)`` tensors (for :mod:`bayescal.check`)."""


class MaterialModel(Integrable):
    """A uniaxial strain-controlled model: ``dx/dt = rate(x) + coupling * d(strain)/dt``.

    Subclasses set ``name``, ``parameters``, ``state_names`` (stress first) and implement
    :meth:`rate`. Parameters arrive as tensors broadcastable against ``state[..., 0]``.
    """

    name: ClassVar[str]
    parameters: ClassVar[tuple[str, ...]]
    state_names: ClassVar[tuple[str, ...]]
    summary: ClassVar[str] = ""

    @property
    def n_state(self) -> int:
        return len(self.state_names)

    #: Whether :meth:`rate` uses the path's temperature (the model is driven by it).
    thermal: ClassVar[bool] = False
    #: Parameters a card may omit, fixed at these values (documented defaults).
    defaults: ClassVar[Mapping[str, float]] = {}

    @abstractmethod
    def rate(self, state: torch.Tensor, p: Params, temperature: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """State rate at fixed total strain and its Jacobian ``d rate / d state``.

        ``state`` has shape ``(..., n_state)``; returns ``(..., n_state)`` and
        ``(..., n_state, n_state)``. ``temperature`` (K, shape ``state.shape[:-1]``) is the
        path's temperature at the state's time, or None where the path has none; only
        :attr:`thermal` models read it.
        """

    def bound_iterate(self, state: torch.Tensor, p: Params, rate_bound: torch.Tensor
                      ) -> torch.Tensor:
        """``state`` (``(..., n_state)``, parameters and ``rate_bound`` broadcastable against
        ``state[..., 0]``) moved into the region where a solution can lie, for a Newton
        iterate. ``rate_bound`` (1/s) is :data:`RATE_MARGIN` times the path's largest total
        strain rate: under strain control the plastic strain rate stays below it. The
        default sets no region (``state`` as it is), and the solver then skips the call
        (:meth:`StrainControlledResidual.iterate_bound`)."""
        return state

    def strain_coupling(self, p: Params, like: torch.Tensor) -> torch.Tensor:
        """``d(state rate) / d(strain rate)``: Young's modulus on the stress component."""
        E = torch.as_tensor(p["E"], dtype=like.dtype, device=like.device)
        E = torch.broadcast_tensors(E, like[..., 0])[0]
        return torch.nn.functional.pad(E[..., None], (0, self.n_state - 1))

    def factory(self, params: Params, scheme: str = "backward-euler"
                ) -> StrainControlledResidual:
        return StrainControlledResidual(self, params, scheme)

    def stages(self, scheme: str) -> int:
        return SCHEMES[scheme].stages

    def order(self, scheme: str) -> int:
        return SCHEMES[scheme].order

    def stage_times(self, scheme: str) -> tuple[float, ...]:
        return SCHEMES[scheme].c

    def forces(self, time, strain, temperature=None):
        """Time and strain, and for a :attr:`thermal` model the path's temperature where
        it has one (isothermal models do not use it)."""
        if self.thermal and temperature is not None:
            return time[..., None], strain[..., None], temperature[..., None]
        return time[..., None], strain[..., None]

    def stress(self, state: torch.Tensor) -> torch.Tensor:
        return state[..., 0]

    def dense_jacobian(self, jacobian):
        return jacobian.diag, jacobian.sub.expand_as(jacobian.diag)


def _power_flow(f: torch.Tensor, eta: torch.Tensor, n: torch.Tensor):
    """Perzyna flow ``<f/eta>^n`` and its derivative with respect to f."""
    active = f > 0.0  # (float literals: an int is cast to the tensor's dtype in every call)
    ratio = torch.where(active, f / eta, torch.zeros_like(f))
    # one power (the costliest elementwise call here), not two
    lower = torch.where(active, ratio ** (n - 1.0), torch.zeros_like(f))
    return lower * ratio, n / eta * lower


#: :meth:`MaterialModel.bound_iterate`'s margin over a path's largest total strain rate.
#: Under strain control the plastic strain rate follows the total one: it lags it after a
#: rise of the rate and relaxes from it after a fall, and exceeds it only in a transient
#: of a softening flow stress; a hundredfold margin keeps every solution inside the bound.
RATE_MARGIN = 100.0


def _jc_flow(f: torch.Tensor, C: torch.Tensor, eps0: torch.Tensor):
    """Johnson-Cook-type flow ``eps0 (exp(<f>/C) - 1)`` and its derivative with respect to f."""
    active = f > 0.0
    expo = torch.exp(torch.where(active, f, torch.zeros_like(f)) / C)
    return eps0 * (expo - 1.0), torch.where(active, eps0 / C * expo, torch.zeros_like(f))


def catalogued(name: str):
    """Class decorator: the model's ``name``, ``parameters``, ``state_names`` and ``summary``
    from :data:`bayescal.catalogue.CATALOGUE`, where they are written down once."""
    entry = CATALOGUE[name]

    def describe(cls):
        cls.name, cls.parameters = entry.name, entry.parameters
        cls.state_names, cls.summary = entry.state_names, entry.summary
        return cls

    return describe


@catalogued("perzyna-voce")
class PerzynaVoce(MaterialModel):
    """Elastic-viscoplastic with Voce isotropic hardening; state (sigma, R)."""

    def rate(self, state, p, temperature=None):
        sigma, R = state[..., 0], state[..., 1]
        sign = torch.sign(sigma)
        f = sigma.abs() - (p["sy"] + R)
        p_dot, q = _power_flow(f, p["eta"], p["n"])
        E, d, Rinf = p["E"], p["d"], p["Rinf"]
        h = d * (Rinf - R)
        rate = _stack([-E * p_dot * sign, h * p_dot])
        jac = _stack_jacobian([
            [-E * q, E * q * sign],
            [h * q * sign, -d * p_dot - h * q],
        ])
        return rate, jac


@catalogued("chaboche")
class Chaboche(MaterialModel):
    """Perzyna-Voce plus one Armstrong-Frederick backstress; state (sigma, R, X)."""

    def rate(self, state, p, temperature=None):
        sigma, R, X = state[..., 0], state[..., 1], state[..., 2]
        sign = torch.sign(sigma - X)
        f = (sigma - X).abs() - (p["sy"] + R)
        p_dot, q = _power_flow(f, p["eta"], p["n"])
        E, d, Rinf, C, g = p["E"], p["d"], p["Rinf"], p["C"], p["g"]
        h = d * (Rinf - R)
        k = C * sign - g * X  # X rate per unit p_dot
        rate = _stack([-E * p_dot * sign, h * p_dot, k * p_dot])
        jac = _stack_jacobian([
            [-E * q, E * q * sign, E * q],
            [h * q * sign, -d * p_dot - h * q, -h * q * sign],
            [k * q * sign, -k * q, -k * q * sign - g * p_dot],
        ])
        return rate, jac


@catalogued("voce-jc")
class VoceJC(MaterialModel):
    """Voce hardening with a Johnson-Cook-type rate law as a flow rule; state (sigma, R)."""

    def rate(self, state, p, temperature=None):
        sigma, R = state[..., 0], state[..., 1]
        sign = torch.sign(sigma)
        E, d, Rinf = p["E"], p["d"], p["Rinf"]
        flow = p["sy"] + R
        f = sigma.abs() / flow - 1.0
        p_dot, dp_df = _jc_flow(f, p["C"], p["eps0"])
        df_dsigma = sign / flow
        df_dR = -sigma.abs() / flow**2
        h = d * (Rinf - R)
        rate = _stack([-E * p_dot * sign, h * p_dot])
        jac = _stack_jacobian([
            [-E * dp_df * df_dsigma * sign, -E * dp_df * df_dR * sign],
            [h * dp_df * df_dsigma, -d * p_dot + h * dp_df * df_dR],
        ])
        return rate, jac

    def bound_iterate(self, state, p, rate_bound):
        """|sigma| at most the flow stress times ``1 + C ln(1 + rate_bound / eps0)``, the
        overstress of the plastic strain rate ``rate_bound``. Reason: Newton started from an
        overshooting predictor (an elastic step across yield) meets ``exp(f / C)`` far up
        its exponential range, where each iteration takes only about ``C`` off ``f``
        (tens of iterations at high rates); from the bound it takes a few."""
        sigma, R = state[..., 0], state[..., 1]
        limit = (p["sy"] + R) * (1.0 + p["C"] * torch.log1p(rate_bound / p["eps0"]))
        return torch.stack([torch.maximum(torch.minimum(sigma, limit), -limit), R], dim=-1)


def johnson_cook_softening(T: torch.Tensor, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Johnson-Cook thermal softening ``1 - T*^m``, ``T* = <T - Tref> / (Tmelt - Tref)``,
    and its derivative with respect to T. No softening below ``Tref`` (where ``T*^m`` has
    no real value for a fractional ``m``)."""
    span = p["Tmelt"] - p["Tref"]
    above = T > p["Tref"]
    star = torch.where(above, (T - p["Tref"]) / span, torch.ones_like(T))
    power = star ** p["m"]
    g = torch.where(above, 1.0 - power, torch.ones_like(T))
    dg = torch.where(above, -p["m"] * power / star / span, torch.zeros_like(T))
    return g, dg


def piecewise_linear(T: torch.Tensor, knots: Sequence[float], ordinates: Sequence[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation of ``ordinates`` (each broadcastable against ``T``) at
    increasing temperatures ``knots``, constant beyond the first and last knot; returns the
    value and its derivative with respect to T."""
    x = torch.as_tensor(knots, dtype=T.dtype, device=T.device)
    T, *ordinates = torch.broadcast_tensors(T, *ordinates)
    y = torch.stack(ordinates, dim=-1)
    # the segment of each T: the number of interior knots at or below it
    i = (T[..., None] >= x[1:-1]).sum(dim=-1, keepdim=True)
    y0, y1 = y.gather(-1, i)[..., 0], y.gather(-1, i + 1)[..., 0]
    x = x.expand_as(y)
    x0, x1 = x.gather(-1, i)[..., 0], x.gather(-1, i + 1)[..., 0]
    width = x1 - x0
    inside = (T > x[..., 0]) & (T < x[..., -1])
    u = ((T - x0) / width).clamp(0.0, 1.0)
    return y0 + u * (y1 - y0), torch.where(inside, (y1 - y0) / width, torch.zeros_like(T))


#: How a thermal model softens with temperature: the ``[model] softening`` of a card.
SOFTENINGS = ("johnson-cook", "piecewise-linear")


@catalogued("voce-jc-thermal")
class VoceJCThermal(MaterialModel):
    """:class:`VoceJC` with temperature: thermal softening of the flow stress and
    Taylor-Quinney heating by plastic work; state (sigma, R, heating).

    The temperature is ``T = T_path(t) + heating``: the path's temperature (the data's
    ``temperature`` column, or the parameter ``T0`` where there is none) plus the rise
    from plastic work, which is the state (zero at the first point). Writing the state as
    the rise, not as T itself, keeps the initial state zero, keeps a temperature history in
    the data (a furnace ramp) driving the model, and gives the state a size (tens of K)
    comparable to the stresses in one residual norm. The rise follows
    ``heating_dot = chi beta |sigma| p_dot / rho_c`` with the adiabatic fraction
    ``chi = p_dot / (p_dot + rate_ad)``: heat leaves a slowly strained bar (chi -> 0) and
    has no time to at high rates (chi -> 1).

    The flow stress ``(sy + R)`` is multiplied by ``g(T)``: Johnson-Cook ``1 - T*^m`` by
    default, or, with ``softening = "piecewise-linear"`` and knot ``temperatures``, the
    linear interpolation of calibratable ordinates ``softening_0 ..`` (a temperature
    dependence of any shape, fitted from tests at several temperatures).
    """

    thermal = True
    base = ("E", "sy", "Rinf", "d", "C", "eps0")
    heat = ("beta", "rho_c", "rate_ad", "T0")
    #: Steel values: Taylor-Quinney coefficient 0.9, rho c of 304L (7.9 g/cm3 x 0.5 J/(g K)
    #: = 3.95 MPa/K), a transition from isothermal to adiabatic around 1 /s, room
    #: temperature, and Johnson-Cook's reference and melting temperatures of 304L.
    defaults = {"beta": 0.9, "rho_c": 3.95, "rate_ad": 1.0, "T0": 293.15, "Tref": 293.15,
                "Tmelt": 1673.0}

    def __init__(self, softening: str = "johnson-cook",
                 temperatures: Sequence[float] | None = None) -> None:
        if softening not in SOFTENINGS:
            raise ValueError(f"softening {softening!r} must be one of {SOFTENINGS}")
        knots = tuple(float(t) for t in temperatures or ())
        if softening == "piecewise-linear":
            if len(knots) < 2 or any(b <= a for a, b in zip(knots, knots[1:])):
                raise ValueError("piecewise-linear softening needs at least two increasing "
                                 "temperatures")
            self.parameters = self.base + tuple(
                f"softening_{i}" for i in range(len(knots))) + self.heat
        elif knots:
            raise ValueError("temperatures apply only to piecewise-linear softening")
        self.softening, self.temperatures = softening, knots

    def temperature(self, state: torch.Tensor, p: Params,
                    temperature: torch.Tensor | None = None) -> torch.Tensor:
        """Temperature (K) of a state: the path's (or ``T0``) plus the heating."""
        ambient = p["T0"] if temperature is None else temperature
        return ambient + state[..., 2]

    def softening_factor(self, T: torch.Tensor, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(T)`` and ``dg/dT``."""
        if self.softening == "johnson-cook":
            return johnson_cook_softening(T, p)
        ordinates = [p[f"softening_{i}"] for i in range(len(self.temperatures))]
        return piecewise_linear(T, self.temperatures, ordinates)

    def rate(self, state, p, temperature=None):
        sigma, R = state[..., 0], state[..., 1]
        sign = torch.sign(sigma)
        E, d, Rinf = p["E"], p["d"], p["Rinf"]
        g, dg = self.softening_factor(self.temperature(state, p, temperature), p)
        hard = p["sy"] + R
        flow = g * hard
        f = sigma.abs() / flow - 1.0
        p_dot, q = _jc_flow(f, p["C"], p["eps0"])
        df = (sign / flow, -sigma.abs() / flow**2 * g, -sigma.abs() / flow**2 * hard * dg)
        h = d * (Rinf - R)
        # heating per unit plastic work: chi(p_dot) p_dot = p_dot^2 / (p_dot + rate_ad)
        k = p["beta"] / p["rho_c"]
        a = p["rate_ad"]
        work = p_dot**2 / (p_dot + a)
        dwork = q * p_dot * (p_dot + 2 * a) / (p_dot + a) ** 2  # d work / d f
        heating = k * sigma.abs() * work
        rate = _stack([-E * p_dot * sign, h * p_dot, heating])
        jac = _stack_jacobian([
            [-E * q * dfi * sign for dfi in df],
            [h * q * df[0], -d * p_dot + h * q * df[1], h * q * df[2]],
            [k * (sign * work + sigma.abs() * dwork * df[0]),
             k * sigma.abs() * dwork * df[1], k * sigma.abs() * dwork * df[2]],
        ])
        return rate, jac


MODELS: dict[str, type[MaterialModel]] = {
    cls.name: cls for cls in (PerzynaVoce, Chaboche, VoceJC, VoceJCThermal)
}


def get_model(name: str, **options) -> MaterialModel:
    """Instantiate a built-in model by name (``options``: a model's settings from the card's
    ``[model]`` table, e.g. a thermal model's ``softening``)."""
    return MODELS[name](**options)


class StrainControlledResidual(torch.nn.Module, NonlinearFunctionOperatorFactory):
    """pyzag factory for the implicit Runge-Kutta residual of a strain-controlled model.

    A step of a stiffly accurate scheme (:mod:`bayescal.schemes`) with stages
    ``Y_1 .. Y_s`` (``Y_s`` the state at the end of the step) has, for every stage ``i``,
    ``R_i = Y_i - x_{k-1} - dt_k sum_j a_ij rate(Y_j) - c_i coupling (strain_k - strain_{k-1})``
    (strain is linear in time within a step, so its contribution is exact). pyzag's state
    at step ``k`` is all stages, ``(Y_1, .., Y_s)`` flattened, so that the step keeps a
    lookback of one: ``x_{k-1}`` is the last stage of the previous state. The diagonal block
    is ``delta_ij I - dt a_ij J(Y_j)``, the sub-diagonal ``-I`` in the last stage's column
    for every stage. Backward Euler is the one-stage case, ``R = x_k - x_{k-1} - dt
    rate(x_k) - coupling * (strain_k - strain_{k-1})``.

    Forces are ``(time, strain)``, each of shape ``(step, batch, 1)``, and for a thermal
    model the path's temperature where it has one (linear in time within a step, passed to
    :meth:`MaterialModel.rate` at the stage times). Parameter tensors are
    held as attributes; those that require grad are listed in ``converted_params`` so that
    :func:`pyzag.nonlinear.solve_adjoint` differentiates with respect to them.
    """

    def __init__(self, model: MaterialModel, params: Params,
                 scheme: str = "backward-euler") -> None:
        super().__init__()
        self.model = model
        self.scheme = SCHEMES[scheme]
        self.converted_params = [key for key, value in params.items() if value.requires_grad]
        for key, value in params.items():
            setattr(self, key, value)
        self._wrapper = DenseODEWrapper()
        self._cache_key: tuple | None = None
        self._cache: dict[str, torch.Tensor] = {}

    def restrict(self, index: torch.Tensor) -> StrainControlledResidual:
        """The same residual for the batch entries ``index`` (the retrying solver re-solves
        only the specimens whose Newton failed, not the whole batch)."""
        params = {key: value.detach()[index] for key, value in self.params().items()}
        return StrainControlledResidual(self.model, params, self.scheme.name)

    def iterate_bound(self, strain_rate: torch.Tensor):
        """The model's :meth:`MaterialModel.bound_iterate` as a function of a Newton
        iterate (``(step, batch, stages * n_state)``, every stage bounded), for paths whose
        largest total strain rates are ``strain_rate`` ``(batch,)``; None where the model
        sets no bound (does not override it)."""
        if type(self.model).bound_iterate is MaterialModel.bound_iterate:
            return None
        s, n = self.scheme.stages, self.model.n_state
        p = {key: value.detach()[:, None] for key, value in self.params().items()}
        rate_bound = (RATE_MARGIN * strain_rate)[:, None]

        def bound(x: torch.Tensor) -> torch.Tensor:
            return self.model.bound_iterate(x.unflatten(-1, (s, n)), p, rate_bound).flatten(-2)

        return bound

    @property
    def lookback(self) -> int:
        return 1

    @property
    def wrapper(self):
        return self._wrapper

    def params(self) -> dict[str, torch.Tensor]:
        """The parameter tensors, by name."""
        return {key: getattr(self, key) for key in self.model.parameters}

    def _constants(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The scheme's tensors, made once per dtype and device: a Newton iteration
        evaluates the residual of a small chunk, where making them anew cost more than the
        arithmetic."""
        key = (like.dtype, like.device)
        if self._cache_key != key:
            s, n = self.scheme.stages, self.model.n_state
            kw = {"dtype": like.dtype, "device": like.device}
            a = torch.tensor(self.scheme.a, **kw)
            sub = torch.zeros(s * n, s * n, **kw)
            sub[:, (s - 1) * n:] = -torch.eye(n, **kw).repeat(s, 1)
            self._cache = {"a": a, "c": torch.tensor(self.scheme.c, **kw),
                           "a_blocks": a[:, None, :, None], "eye": torch.eye(s * n, **kw),
                           "sub": sub}
            self._cache_key = key
        return self._cache

    def chunk_terms(self, forces) -> dict:
        """The parts of the residual of a chunk (its ``forces``, ``(step + 1, batch, 1)``
        each) that do not depend on the state: the steps' ``dt``, the strain's drive of
        every stage, the parameters shaped for :meth:`MaterialModel.rate` and the stages'
        temperatures. Made once per chunk by its operator (:class:`ResidualChunk`), not in
        each of its Newton iterations: a Newton evaluation's cost at these batch sizes is
        mostly its count of torch calls (149 at 662cb25, 129 with this and the in-place
        block substitution; benchmarks/README.md, scale)."""
        time, strain, *temperature = forces
        c = self._constants(time)["c"]
        dstrain = (strain[1:] - strain[:-1])[..., None]  # (step, batch, 1, 1)
        p = self.params()
        coupling = self.model.strain_coupling(p, time[0])  # (batch, n)
        return {
            "dt": (time[1:] - time[:-1])[..., None],  # (step, batch, 1, 1)
            "drive": (c[:, None] * dstrain) * coupling[:, None, :],  # (step, batch, stage, n)
            "params": {key: v[..., None] for key, v in p.items()},
            # a thermal model's forces carry the path's temperature: linear in time within
            # a step, like strain (isothermal models keep their two-argument rate)
            "temperature": [T[:-1, ..., None] + c * (T[1:] - T[:-1])[..., None]
                            for T in (f[..., 0] for f in temperature)],
        }

    def evaluate_raw(self, x_full, forces, terms: dict | None = None):
        """Residual and block Jacobian of the steps of ``x_full`` (the chunk's states after
        the one before it) under ``forces``; ``terms``: their :meth:`chunk_terms`, where
        the caller made them already."""
        terms = self.chunk_terms(forces) if terms is None else terms
        s, n = self.scheme.stages, self.model.n_state
        k = self._constants(x_full)
        stages = x_full[1:].unflatten(-1, (s, n))  # (step, batch, stage, n)
        x_prev = x_full[:-1, ..., None, (s - 1) * n:]  # (step, batch, 1, n)
        rate, jac = self.model.rate(stages, terms["params"], *terms["temperature"])
        dt = terms["dt"]
        R = stages - x_prev - dt * (k["a"] @ rate) - terms["drive"]
        # K[.., i, u, j, v] = a_ij J(Y_j)[u, v], built in that memory order
        coupled = k["a_blocks"] * jac.transpose(-3, -2)[..., None, :, :, :]
        diag = k["eye"] - dt * coupled.reshape(*coupled.shape[:-4], s * n, s * n)
        return R.flatten(-2), self.wrapper.wrap_jacobian(diag, k["sub"].expand_as(diag))

    def make_operator(self, prev_solution, forces, inverse_operator):
        return ResidualChunk(self, prev_solution, forces, inverse_operator)


class ResidualChunk(ChunkOp):
    """pyzag's operator of one chunk (:class:`~pyzag.nonlinear.ChunkOp`), with the chunk's
    :meth:`StrainControlledResidual.chunk_terms` made once, for all its Newton
    iterations."""

    def __init__(self, factory: StrainControlledResidual, prev_solution, forces,
                 inverse_operator) -> None:
        super().__init__(factory, prev_solution, forces, inverse_operator)
        self.terms = factory.chunk_terms(forces)

    def __call__(self, x):
        wrapper = self.factory.wrapper
        x_full = torch.cat([self.prev_solution, wrapper.unwrap_vector(x)])
        R, J = self.factory.evaluate_raw(x_full, self.forces, self.terms)
        return wrapper.wrap_vector(R), J.forward_system(self.inverse_operator)
