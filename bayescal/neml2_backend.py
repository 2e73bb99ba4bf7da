"""NEML2 models as a backend: an equation system from a NEML2 input file, driven uniaxially.

A card with ``[model] backend = "neml2"`` names an input file and one of its equation
systems. The system is loaded with :func:`neml2.load_nonlinear_system` and wrapped as a pyzag
operator factory by :class:`neml2.pyzag.NEML2PyzagModel`, always with ``include_parameters``
set to the card's parameters (without it every tensor of the file would become trainable).
It then runs through the same solver path as the built-in models
(:func:`bayescal.integrate.integrate`: sub-steps, chunked Newton with retries and NaN
detection, pyzag's adjoint).

**Forces.** bayescal drives a system the way NEML2's 1D examples do: mixed control of the
symmetric strain/stress tensor, the axial strain given and the other five stress
components held at zero. The system's forces must be among

* ``t`` — time (s), from the data;
* ``temperature`` — K, from the data's ``temperature`` column (required when the system
  has this force);
* ``fixed_values`` and ``control`` — the SR2 inputs of a ``MixedControlSetup``:
  ``fixed_values = (strain, 0, 0, 0, 0, 0)``, ``control = (0, 1, 1, 1, 1, 1)``;

and its unknowns must include that setup's ``mixed_state``, whose first (xx) component is
then the axial stress (MPa).

**Parameters** are named as ``NEML2PyzagModel`` names them: ``<block>_<parameter>``, e.g.
``A_value`` for a ``ScalarConstantParameter`` block ``[A]``. A parameter with several
components (e.g. ``R_ordinate``, the ordinates of an interpolation table) becomes one scalar
parameter per component, ``R_ordinate_0``, ``R_ordinate_1``, ..., each with the card's
bounds, prior, spread and value: these are the names in the fit's output.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from pyzag.nonlinear import ChunkOp, NonlinearFunctionOperatorFactory

from bayescal.errors import BadInput
from bayescal.material import Integrable, Params

TIME, TEMPERATURE, FIXED, CONTROL, MIXED_STATE = (
    "t", "temperature", "fixed_values", "control", "mixed_state")
FORCES = (TIME, TEMPERATURE, FIXED, CONTROL)
SR2_SIZE = 6


def import_neml2(where: str):
    """The ``neml2`` module, or :class:`BadInput` naming ``where`` if it is not installed."""
    try:
        import neml2
    except ImportError:
        raise BadInput(f"{where} backend = 'neml2' needs the neml2 package: "
                       "pip install 'bayescal[neml2]'") from None
    return neml2


@contextlib.contextmanager
def _float64():
    """NEML2 builds the file's tensors in the default dtype: make it float64 meanwhile."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def input_file(card: Path, file: str, where: str) -> Path:
    """The NEML2 input file that the card ``card`` names as ``file``, resolved against the
    card's folder: a :class:`BadInput` naming ``where`` unless it is a regular file in that
    folder or below it (links resolved). A card, one read back from a posterior included,
    then cannot make bayescal open, or tell whether there is, a file elsewhere."""
    folder = card.parent.resolve()
    path = card.parent / file
    if not path.resolve().is_relative_to(folder):
        raise BadInput(f"{where} file {file!r} is outside the card's folder {folder} (the "
                       "input file must sit next to the card or below it)")
    if not path.is_file():
        problem = "is not a regular file" if path.exists() else "not found"
        raise BadInput(f"{where} file {file!r} {problem} (looked for {path})")
    return path


def load_system(file: Path, system: str, where: str):
    """``neml2.load_nonlinear_system(file, system)`` in float64; a file NEML2 rejects is a
    :class:`BadInput` naming ``where``."""
    neml2 = import_neml2(where)
    try:
        with _float64():
            return neml2.load_nonlinear_system(str(file), system)
    except Exception as exc:  # NEML2 raises many types for a bad file
        message = " ".join(str(exc).split())
        raise BadInput(f"{where} cannot load system {system!r} from {file}: "
                       f"{type(exc).__name__}: {message}") from None


def _wrap(system, where: str, include: list[str] | None):
    """``NEML2PyzagModel`` of ``system`` (every parameter when ``include`` is None)."""
    neml2 = import_neml2(where)
    try:
        return neml2.pyzag.NEML2PyzagModel(system, include_parameters=include)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{where} {' '.join(str(exc).split())}") from None


@dataclass(frozen=True)
class SystemInfo:
    """What a card needs to know of a NEML2 system: its parameters (NEML2 name -> shape),
    forces and unknowns."""

    parameters: dict[str, tuple[int, ...]]
    forces: tuple[str, ...]
    unknowns: tuple[str, ...]


def describe(file: Path, system: str, where: str) -> SystemInfo:
    """Load ``system`` of ``file`` and check that bayescal can drive it (see the module
    docstring); ``where`` starts every error message (e.g. ``"card.toml: [model]"``)."""
    wrapped = _wrap(load_system(file, system, where), where, None)
    info = SystemInfo(
        parameters={name: tuple(p.shape) for name, p in wrapped.named_parameters()},
        forces=tuple(wrapped.fvars),
        unknowns=tuple(wrapped.svars),
    )
    unknown = [f for f in info.forces if f not in FORCES]
    if unknown:
        raise BadInput(f"{where} system {system!r} of {file.name} has force(s) "
                       f"{', '.join(unknown)} that bayescal cannot drive (it gives "
                       f"{', '.join(FORCES)})")
    missing = [f for f in (TIME, FIXED, CONTROL) if f not in info.forces]
    if missing or MIXED_STATE not in info.unknowns:
        raise BadInput(f"{where} system {system!r} of {file.name} is not in uniaxial mixed "
                       f"control: bayescal needs the forces {TIME}, {FIXED}, {CONTROL} and the "
                       f"unknown {MIXED_STATE} of a MixedControlSetup (see docs/neml2.md)")
    return info


def component_names(name: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    """The scalar parameters of NEML2 parameter ``name``: itself for a scalar, else
    ``name_0``, ``name_1``, ... (row-major over ``shape``)."""
    if not shape:
        return (name,)
    return tuple(f"{name}_{i}" for i in range(math.prod(shape)))


class BoundSystem(torch.nn.Module, NonlinearFunctionOperatorFactory):
    """A ``NEML2PyzagModel`` with one solve's parameter values, as a pyzag factory.

    The wrapped system is shared (and compiled once); each solve gets its own binding, which
    sets its values on the system before every evaluation. So a solve's adjoint, run after
    other solves (e.g. one backward pass over several particles' solves), still evaluates
    with that solve's parameters. Values that require grad are the adjoint's
    (``converted_params``).
    """

    def __init__(self, system, values: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "system", system)  # not a submodule: no parameters of its own
        self.names = tuple(values)
        for name, value in values.items():
            setattr(self, name, value)
        self.converted_params = [name for name, value in values.items() if value.requires_grad]

    @property
    def lookback(self) -> int:
        return self.system.lookback

    @property
    def wrapper(self):
        return self.system.wrapper

    def evaluate_raw(self, x_full, forces):
        for name in self.names:
            setattr(self.system, name, getattr(self, name))
        return self.system.evaluate_raw(x_full, forces)

    def make_operator(self, prev_solution, forces, inverse_operator):
        return ChunkOp(self, prev_solution, forces, inverse_operator)


class NEML2Model(Integrable):
    """A NEML2 equation system as an :class:`~bayescal.material.Integrable`.

    ``shapes`` maps the NEML2 parameters bayescal sets (the card's, in its order) to their
    shapes; :attr:`parameters` are their scalar components (:func:`component_names`).
    With ``compile`` the residual runs through :func:`neml2.compile` (``torch.compile``):
    faster per evaluation after a compilation for every new chunk and batch shape.
    """

    name = "neml2"

    def __init__(self, file: Path, system: str, shapes: Mapping[str, tuple[int, ...]],
                 compile: bool = False, where: str | None = None) -> None:
        where = where or f"{file}:"
        self.file, self.system, self.compiled = Path(file), system, compile
        self.shapes = dict(shapes)
        self.parameters = tuple(c for n, s in self.shapes.items() for c in component_names(n, s))
        self._factory = _wrap(load_system(self.file, system, where), where, list(self.shapes))
        # every parameter becomes a plain (batch, ...) tensor, set by BoundSystem
        for name in self._factory.parameter_names:
            delattr(self._factory, name)
        self._device = torch.device("cpu")
        state = self._factory.slayout
        offsets = [0]
        for var in state.vars():
            offsets.append(offsets[-1] + math.prod(state.specs[var].BASE_SHAPE or (1,)))
        self._stress_index = offsets[list(state.vars()).index(MIXED_STATE)]
        if compile:
            import_neml2(where).compile(self._factory)

    @property
    def n_state(self) -> int:
        return self._factory.nstate

    @property
    def needs_temperature(self) -> bool:
        return TEMPERATURE in self._factory.fvars

    def factory(self, params: Params, scheme: str = "backward-euler") -> BoundSystem:
        """The wrapped system bound to every parameter's ``(batch, *shape)`` values (the
        input file's own time discretisation: ``scheme`` does not apply)."""
        values = {}
        for name, shape in self.shapes.items():
            parts = [params[c] for c in component_names(name, shape)]
            values[name] = parts[0] if not shape else torch.stack(parts, -1).reshape(
                *parts[0].shape, *shape)
        return BoundSystem(self._factory, values)

    def forces(self, time, strain, temperature=None):
        """One flat force tensor ``(step, batch, n)`` in the system's force layout."""
        if time.device != self._device:
            self._factory.sys.to(device=time.device)
            self._device = time.device
        values = {TIME: time}
        if self.needs_temperature:
            if temperature is None:
                raise BadInput(f"{self.file}: system {self.system!r} is driven by temperature: "
                               "the data (or load path) need a temperature column (K)")
            values[TEMPERATURE] = temperature
        fixed = torch.zeros(*time.shape, SR2_SIZE, dtype=time.dtype, device=time.device)
        fixed[..., 0] = strain
        control = torch.ones_like(fixed)
        control[..., 0] = 0.0
        values[FIXED], values[CONTROL] = fixed, control
        return (self._factory.assemble_forces(values),)

    def stress(self, state: torch.Tensor) -> torch.Tensor:
        return state[..., self._stress_index]

    def dense_jacobian(self, jacobian):
        def dense(matrix):
            return torch.cat([torch.cat([block.data for block in row], -1)
                              for row in matrix.tensors], -2)

        return dense(jacobian.diag_am), dense(jacobian.sub_am)
