"""Model cards: the TOML file naming a material model, its parameters, priors and solver settings.

Every problem in a card is reported as a :class:`~bayescal.errors.BadInput` with one line
naming the file and the table; unknown keys are errors so that typos never pass silently.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from bayescal.data import check_input_file
from bayescal.errors import BadInput
from bayescal.material import MODELS, SOFTENINGS, Integrable, MaterialModel, get_model
from bayescal.schemes import SCHEMES
from bayescal.integrate import SolverOptions

VARIES = ("specimen", "shared")
BACKENDS = ("builtin", "neml2")
_TABLES = ("model", "solver", "parameters", "noise")
#: Largest accepted ``[solver]`` tolerances. Newton stops once the residual's norm falls
#: below ``atol`` (MPa, the residual is a stress-rate balance per step) or by the factor
#: ``rtol``: looser values let an unconverged state, even all zeros, pass as a solution
#: (``atol = 1e8`` made every stress zero), and the fit then sees nothing of the data.
MAX_RTOL = 1e-3
MAX_ATOL = 1e-2


@dataclass(frozen=True)
class ParameterSpec:
    """One material parameter: fixed at ``value``, or calibrated within ``bounds``.

    ``prior`` is (centre, sd) of the population mean in physical units; ``varies`` is
    "specimen", "shared" or "fixed"; ``spread`` is the prior scale of the specimen-to-specimen
    coefficient of variation. A calibrated parameter may carry an initial ``value``.
    """

    name: str
    value: float | None
    bounds: tuple[float, float] | None
    prior: tuple[float, float] | None
    varies: str
    spread: float = 0.1

    @property
    def is_fixed(self) -> bool:
        return self.varies == "fixed"


@dataclass(frozen=True)
class ModelSpec:
    """A loaded model card. ``parameters`` are in the model's parameter order.

    For a NEML2 card, ``neml2_shapes`` maps the NEML2 parameters the card sets to their
    shapes (``parameters`` holds their scalar components) and ``compile`` asks for
    :func:`neml2.compile`.
    """

    model: str
    backend: str
    file: Path | None
    system: str | None
    solver: SolverOptions
    parameters: dict[str, ParameterSpec]
    path: Path
    noise_prior_scale: float = 10.0
    text: str = ""  # the card's TOML text, stored with a fit's output
    compile: bool = False
    neml2_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: a built-in model's settings from ``[model]`` (a thermal model's ``softening`` and
    #: ``temperatures``)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def calibrated(self) -> tuple[str, ...]:
        return tuple(n for n, p in self.parameters.items() if not p.is_fixed)

    @property
    def varying(self) -> tuple[str, ...]:
        return tuple(n for n, p in self.parameters.items() if p.varies == "specimen")

    @property
    def shared(self) -> tuple[str, ...]:
        return tuple(n for n, p in self.parameters.items() if p.varies == "shared")

    @property
    def fixed(self) -> tuple[str, ...]:
        return tuple(n for n, p in self.parameters.items() if p.is_fixed)


#: A model card is a few kB; anything far larger is not one.
MAX_CARD_BYTES = 1 << 20


def load_card(path: str | os.PathLike) -> ModelSpec:
    """Read and validate a model card."""
    path = Path(path)
    check_input_file(path, limit=MAX_CARD_BYTES)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read: {exc}") from None
    return parse_card(text, path)


def parse_card(text: str, path: str | os.PathLike) -> ModelSpec:
    """Validate a model card given as TOML text; ``path`` names it in messages (and relative
    file names in the card are resolved against its folder). ``ModelSpec.text`` keeps the text,
    so that a fit's output can rebuild its card."""
    path = Path(path)
    try:
        card = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path}: invalid TOML: {exc}") from None

    unknown = [name for name in card if name not in _TABLES]
    if unknown:
        raise BadInput(f"{path}: unknown table {', '.join(f'[{n}]' for n in unknown)} "
                       f"(allowed: {', '.join(f'[{n}]' for n in _TABLES)})")
    if "model" not in card:
        raise BadInput(f"{path}: missing [model] table")

    model = _Table(path, "model", card["model"],
                   ("name", "backend", "file", "system", "compile") + MODEL_OPTIONS)
    backend = model.string("backend", "builtin")
    if backend not in BACKENDS:
        raise model.error(f"backend {backend!r} must be one of {', '.join(map(repr, BACKENDS))}")
    parameters = _Table(path, "parameters", card.get("parameters", {}), allowed=None)
    options: dict[str, Any] = {}
    if backend == "builtin":
        name, options, names, defaults = _builtin(model, parameters)
        file = system = None
    else:
        name, file, system, names = _neml2(model, parameters)
        defaults = {}
    specs = {n: (_parameter(path, n, parameters.data[n]) if n in parameters.data
                 else ParameterSpec(n, defaults[n], None, None, "fixed")) for n in names}
    shapes = _neml2_shapes(model, file, system, specs) if backend == "neml2" else {}
    if shapes:
        from bayescal.neml2_backend import component_names

        specs = {c: replace(specs[n], name=c) for n, shape in shapes.items()
                 for c in component_names(n, shape)}

    solver = _Table(path, "solver", card.get("solver", {}),
                    ("n_chunk", "scheme", "tolerance", "substeps", "transient_substeps", "rtol",
                     "atol"))
    noise = _Table(path, "noise", card.get("noise", {}), ("prior_scale",))
    defaults = SolverOptions()
    scheme = solver.string("scheme", defaults.scheme)
    if scheme not in SCHEMES:
        raise solver.error(f"scheme {scheme!r} must be one of {', '.join(map(repr, SCHEMES))}")
    if backend != "builtin" and "scheme" in solver.data:
        raise solver.error("scheme applies only to built-in models (a NEML2 input file has its "
                           "own time discretisation)")
    substeps = solver.integer("substeps", None)
    transient_substeps = solver.integer("transient_substeps", None)
    if substeps is None and transient_substeps is not None:
        raise solver.error("transient_substeps needs substeps (without them the sub-steps "
                           "follow the tolerance)")
    if substeps is not None and "tolerance" in solver.data:
        raise solver.error("give either tolerance (sub-steps chosen automatically) or "
                           "substeps (fixed by hand), not both")
    return ModelSpec(
        model=name,
        backend=backend,
        file=file,
        system=system,
        solver=SolverOptions(
            n_chunk=solver.integer("n_chunk", defaults.n_chunk),
            scheme=scheme,
            tolerance=solver.positive("tolerance", defaults.tolerance),
            substeps=substeps,
            transient_substeps=transient_substeps,
            rtol=solver.tolerance("rtol", defaults.rtol, MAX_RTOL),
            atol=solver.tolerance("atol", defaults.atol, MAX_ATOL),
        ),
        parameters=specs,
        path=path,
        noise_prior_scale=noise.positive("prior_scale", ModelSpec.noise_prior_scale),
        text=text,
        compile=model.boolean("compile", False),
        neml2_shapes=shapes,
        options=options,
    )


def load_model(spec: ModelSpec, compile: bool | None = None) -> Integrable:
    """The card's model: a built-in one, or the NEML2 system (compiled with ``compile``,
    default: the card's ``[model] compile``)."""
    if spec.backend == "builtin":
        return get_model(spec.model, **spec.options)
    from bayescal.neml2_backend import NEML2Model

    return NEML2Model(spec.file, spec.system, spec.neml2_shapes,
                      compile=spec.compile if compile is None else compile,
                      where=f"{spec.path}: [model]")


def _builtin(model: _Table, parameters: _Table
             ) -> tuple[str, dict[str, Any], tuple[str, ...], Mapping[str, float]]:
    """Model name, settings, parameter names and parameter defaults of a built-in model
    card. A table for the parameter group ``softening`` (piecewise-linear ordinates) applies
    to each of its ordinates ``softening_0`` ..."""
    known = ", ".join(sorted(MODELS))
    for key in ("file", "system", "compile"):
        if key in model.data:
            raise model.error(f"{key} applies only to backend = 'neml2'")
    name = model.string("name")
    if name is None:
        raise model.error(f"missing name (built-in models: {known})")
    if name not in MODELS:
        raise model.error(f"unknown model {name!r} (built-in models: {known})")
    options = _model_options(model, MODELS[name])
    names = get_model(name, **options).parameters
    defaults = MODELS[name].defaults
    groups = {n.rsplit("_", 1)[0] for n in names if n.startswith("softening_")}
    for group in groups & set(parameters.data):
        members = [n for n in names if n.startswith(group + "_")]
        given = [n for n in members if n in parameters.data]
        if given:
            raise BadInput(f"{model.path}: [parameters.{group}] and [parameters.{given[0]}]: "
                           f"give the group or its ordinates, not both")
        for n in members:
            parameters.data[n] = parameters.data[group]
        del parameters.data[group]
    for given in parameters.data:
        if given not in names:
            raise BadInput(f"{model.path}: [parameters.{given}] unknown parameter for {name} "
                           f"(parameters: {', '.join(names)})")
    for needed in names:
        if needed not in parameters.data and needed not in defaults:
            raise BadInput(f"{model.path}: [parameters.{needed}] missing: every parameter of "
                           f"{name} needs at least a value")
    return name, options, names, defaults


#: ``[model]`` settings of built-in thermal models.
MODEL_OPTIONS = ("softening", "temperatures")


def _model_options(model: _Table, cls: type[MaterialModel]) -> dict[str, Any]:
    """A built-in model's settings from ``[model]``, validated."""
    given = [key for key in MODEL_OPTIONS if key in model.data]
    if given and not cls.thermal:
        raise model.error(f"{given[0]} applies only to a thermal model "
                          f"({', '.join(n for n, c in MODELS.items() if c.thermal)})")
    options: dict[str, Any] = {}
    if "softening" in model.data:
        options["softening"] = model.string("softening")
        if options["softening"] not in SOFTENINGS:
            raise model.error(f"softening {options['softening']!r} must be one of "
                              f"{', '.join(map(repr, SOFTENINGS))}")
    if "temperatures" in model.data:
        raw = model.data["temperatures"]
        if not (isinstance(raw, list) and all(map(_is_finite_number, raw))):
            raise model.error(f"temperatures must be a list of numbers (K), got {raw!r}")
        options["temperatures"] = [float(t) for t in raw]
    try:
        cls(**options)
    except ValueError as exc:
        raise model.error(str(exc)) from None
    return options


def _neml2(model: _Table, parameters: _Table) -> tuple[str, Path, str, tuple[str, ...]]:
    """Input file, system name and parameter names of a NEML2 card."""
    name = model.string("name", "neml2")
    if name != "neml2":
        raise model.error(f"name {name!r} conflicts with backend = 'neml2' (omit name)")
    file = model.string("file")
    if file is None:
        raise model.error("backend = 'neml2' needs file (the NEML2 input file)")
    from bayescal.neml2_backend import input_file

    resolved = input_file(model.path, file, f"{model.path}: [model]")
    return "neml2", resolved, model.string("system", "eq_sys"), tuple(parameters.data)


def _neml2_shapes(model: _Table, file: Path, system: str,
                  specs: dict[str, ParameterSpec]) -> dict[str, tuple[int, ...]]:
    """Shapes of the NEML2 parameters the card names (checked against the system)."""
    from bayescal.neml2_backend import component_names, describe

    info = describe(file, system, f"{model.path}: [model]")
    known = ", ".join(sorted(info.parameters))
    for name in specs:
        if name not in info.parameters:
            raise BadInput(f"{model.path}: [parameters.{name}] unknown parameter of system "
                           f"{system!r} in {file.name} (parameters: {known})")
    components = {c: n for n in specs for c in component_names(n, info.parameters[n])}
    for name in specs:
        if name in components and components[name] != name:
            raise BadInput(f"{model.path}: [parameters.{name}] is also the name of a component "
                           f"of {components[name]}: give only one of them")
    return {n: info.parameters[n] for n in specs}


def _parameter(path: Path, name: str, data: Any) -> ParameterSpec:
    """Validate one ``[parameters.NAME]`` table."""
    table = _Table(path, f"parameters.{name}", data, ("value", "bounds", "prior", "varies", "spread"))
    value = table.number("value")
    bounds = table.pair("bounds")
    prior = table.pair("prior")
    if bounds is None and prior is None:
        if value is None:
            raise table.error("needs value (fixed) or bounds and prior (calibrated)")
        for key in ("varies", "spread"):
            if key in table.data:
                raise table.error(f"{key} applies only to a calibrated parameter "
                                  "(give bounds and prior)")
        return ParameterSpec(name, value, None, None, "fixed")
    if bounds is None or prior is None:
        raise table.error("a calibrated parameter needs both bounds and prior "
                          "(a fixed one only value)")
    lo, hi = bounds
    centre, sd = prior
    if not lo < hi:
        raise table.error(f"bounds [{lo!r}, {hi!r}] must be increasing")
    if not lo < centre < hi:
        raise table.error(f"prior centre {centre!r} is not inside bounds [{lo!r}, {hi!r}]")
    if not sd > 0:
        raise table.error(f"prior sd must be positive, got {sd!r}")
    if value is not None and not lo < value < hi:
        raise table.error(f"value {value!r} is not inside bounds [{lo!r}, {hi!r}]")
    varies = table.string("varies", "specimen")
    if varies not in VARIES:
        raise table.error(f"varies {varies!r} must be 'specimen' or 'shared'")
    if varies == "specimen" and lo < 0:
        raise table.error(f"varies = 'specimen' needs bounds from 0 up, got [{lo!r}, {hi!r}] "
                          "(its spread is a coefficient of variation): make it 'shared'")
    return ParameterSpec(name, value, bounds, prior, varies, table.positive("spread", 0.1))


@dataclass
class _Table:
    """One TOML table under validation; errors name the file and the table."""

    path: Path
    name: str
    data: Any
    allowed: tuple[str, ...] | None

    def __post_init__(self) -> None:
        if not isinstance(self.data, dict):
            raise self.error(f"must be a table, got {self.data!r}")
        unknown = [key for key in self.data if self.allowed is not None and key not in self.allowed]
        if unknown:
            raise self.error(f"unknown key {', '.join(map(repr, unknown))} "
                             f"(allowed: {', '.join(self.allowed)})")

    def error(self, message: str) -> BadInput:
        return BadInput(f"{self.path}: [{self.name}] {message}")

    def string(self, key: str, default: str | None = None) -> str | None:
        raw = self.data.get(key, default)
        if raw is not None and not isinstance(raw, str):
            raise self.error(f"{key} must be a string, got {raw!r}")
        return raw

    def number(self, key: str, default: float | None = None) -> float | None:
        raw = self.data.get(key, default)
        if raw is None:
            return None
        if not _is_finite_number(raw):
            raise self.error(f"{key} must be a finite number, got {raw!r}")
        return float(raw)

    def positive(self, key: str, default: float) -> float:
        value = self.number(key, default)
        if not value > 0:
            raise self.error(f"{key} must be positive, got {value!r}")
        return value

    def tolerance(self, key: str, default: float, limit: float) -> float:
        value = self.positive(key, default)
        if value > limit:
            raise self.error(f"{key} must be at most {limit:g}, got {value!r} (a looser "
                             "tolerance accepts unconverged solutions)")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        raw = self.data.get(key, default)
        if not isinstance(raw, bool):
            raise self.error(f"{key} must be true or false, got {raw!r}")
        return raw

    def integer(self, key: str, default: int | None) -> int | None:
        raw = self.data.get(key, default)
        if raw is None:
            return None
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise self.error(f"{key} must be an integer, got {raw!r}")
        if raw < 1:
            raise self.error(f"{key} must be at least 1, got {raw!r}")
        return raw

    def pair(self, key: str) -> tuple[float, float] | None:
        raw = self.data.get(key)
        if raw is None:
            return None
        if not (isinstance(raw, list) and len(raw) == 2 and all(map(_is_finite_number, raw))):
            raise self.error(f"{key} must be two finite numbers, got {raw!r}")
        return float(raw[0]), float(raw[1])


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
