"""Model cards: the shipped cards, defaults, and one clear message for every bad card."""

from pathlib import Path

import pytest

from bayescal.card import ModelSpec, ParameterSpec, load_card
from bayescal.integrate import SolverOptions
from bayescal.errors import BadInput

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

BASE = """\
[model]
name = "perzyna-voce"

[solver]
n_chunk = 10
substeps = 2
rtol = 1e-6
atol = 1e-9

[parameters.E]
value = 200000.0

[parameters.sy]
bounds = [100.0, 600.0]
prior = [250.0, 60.0]

[parameters.Rinf]
bounds = [20.0, 600.0]
prior = [200.0, 60.0]
varies = "shared"

[parameters.d]
bounds = [1.0, 100.0]
prior = [15.0, 5.0]
spread = 0.2

[parameters.eta]
value = 400.0
bounds = [10.0, 2000.0]
prior = [300.0, 100.0]

[parameters.n]
value = 3.0

[noise]
prior_scale = 5.0
"""


def edit(old, new, text=BASE):
    assert old in text, old
    return text.replace(old, new)


def write(tmp_path, text, name="card.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def bad(tmp_path, text):
    """The message that loading ``text`` raises, with the file path shortened to card.toml."""
    path = write(tmp_path, text)
    with pytest.raises(BadInput) as info:
        load_card(path)
    message = str(info.value)
    assert "\n" not in message
    return message.replace(str(path), "card.toml")


# ----------------------------------------------------------------------------- good cards


def test_base_card(tmp_path):
    path = write(tmp_path, BASE)
    spec = load_card(path)
    assert isinstance(spec, ModelSpec)
    assert (spec.model, spec.backend, spec.file, spec.system) == ("perzyna-voce", "builtin", None, None)
    assert spec.path == path
    assert spec.solver == SolverOptions(n_chunk=10, substeps=2, rtol=1e-6, atol=1e-9)
    assert spec.noise_prior_scale == 5.0
    assert list(spec.parameters) == ["E", "sy", "Rinf", "d", "eta", "n"]
    assert spec.parameters["E"] == ParameterSpec("E", 200000.0, None, None, "fixed", 0.1)
    assert spec.parameters["E"].is_fixed
    assert spec.parameters["sy"] == ParameterSpec("sy", None, (100.0, 600.0), (250.0, 60.0), "specimen", 0.1)
    assert spec.parameters["Rinf"].varies == "shared"
    assert spec.parameters["d"].spread == 0.2
    # a value with bounds and prior is the initial value of a calibrated parameter
    assert spec.parameters["eta"].value == 400.0 and not spec.parameters["eta"].is_fixed
    assert spec.calibrated == ("sy", "Rinf", "d", "eta")
    assert spec.varying == ("sy", "d", "eta")
    assert spec.shared == ("Rinf",)
    assert spec.fixed == ("E", "n")


def test_parameters_follow_the_model_order_and_ints_become_floats(tmp_path):
    text = edit("[parameters.E]\nvalue = 200000.0\n", "")
    text += "[parameters.E]\nvalue = 200000\n"
    spec = load_card(write(tmp_path, text))
    assert list(spec.parameters) == ["E", "sy", "Rinf", "d", "eta", "n"]
    assert spec.parameters["E"].value == 200000.0 and isinstance(spec.parameters["E"].value, float)


def test_solver_and_noise_default(tmp_path):
    text = edit("[noise]\nprior_scale = 5.0\n", "")
    text = edit("[solver]\nn_chunk = 10\nsubsteps = 2\nrtol = 1e-6\natol = 1e-9\n", "", text)
    spec = load_card(write(tmp_path, text))
    assert spec.solver == SolverOptions(n_chunk=None, scheme="radau-iia", tolerance=0.05,
                                        substeps=None, rtol=1e-12, atol=1e-8)
    assert spec.solver.automatic
    assert spec.noise_prior_scale == 10.0


def test_scheme_and_tolerance(tmp_path):
    text = edit("substeps = 2\n", 'scheme = "backward-euler"\ntolerance = 0.01\n')
    spec = load_card(write(tmp_path, text))
    assert (spec.solver.scheme, spec.solver.tolerance, spec.solver.substeps) == (
        "backward-euler", 0.01, None)


@pytest.mark.parametrize("old, new, message", [
    ("substeps = 2", 'substeps = 2\nscheme = "rk4"',
     "[solver] scheme 'rk4' must be one of 'backward-euler', 'sdirk2', 'radau-iia', "
     "'radau-iia5'"),
    ("substeps = 2", "substeps = 2\ntolerance = 0.1",
     "[solver] give either tolerance (sub-steps chosen automatically) or substeps (fixed by "
     "hand), not both"),
    ("substeps = 2", "transient_substeps = 8",
     "[solver] transient_substeps needs substeps (without them the sub-steps follow the "
     "tolerance)"),
    ("substeps = 2", "tolerance = 0.0", "[solver] tolerance must be positive, got 0.0"),
])
def test_scheme_and_tolerance_errors(tmp_path, old, new, message):
    assert bad(tmp_path, edit(old, new)) == f"card.toml: {message}"


@pytest.mark.parametrize("name, calibrated, varying, shared, fixed", [
    ("perzyna-voce", ("sy", "Rinf", "d", "eta"), ("sy", "Rinf", "d", "eta"), (), ("E", "n")),
    ("chaboche", ("sy", "Rinf", "d", "C", "g", "eta"), ("sy", "Rinf", "d", "C", "g", "eta"), (),
     ("E", "n")),
    ("voce-jc", ("sy", "Rinf", "d", "C"), ("sy", "Rinf", "d"), ("C",), ("E", "eps0")),
])
def test_shipped_cards(name, calibrated, varying, shared, fixed):
    spec = load_card(MODELS_DIR / f"{name}.toml")
    assert spec.model == name and spec.backend == "builtin"
    assert (spec.calibrated, spec.varying, spec.shared, spec.fixed) == (calibrated, varying, shared, fixed)
    assert spec.parameters["E"].value == 200000.0
    # voce-jc is the 304L tutorial's card: its tolerance is 1/40 of those tests' noise sd
    tolerance = 0.5 if name == "voce-jc" else 0.05
    assert spec.solver == SolverOptions(n_chunk=None, tolerance=tolerance, rtol=1e-12, atol=1e-8)
    assert spec.noise_prior_scale == 10.0
    assert all(spec.parameters[p].spread == 0.1 for p in varying)
    assert MODELS_DIR.joinpath(f"{name}.toml").read_text().startswith("# ")


def test_voce_jc_card_values():
    spec = load_card(MODELS_DIR / "voce-jc.toml")
    assert spec.parameters["eps0"].value == 1.0e-3
    assert spec.parameters["C"].bounds == (0.001, 0.1) and spec.parameters["C"].prior == (0.02, 0.01)


NEML2 = """\
[model]
backend = "neml2"
file = "inputs/model.i"

[parameters.sy_value]
bounds = [100.0, 600.0]
prior = [250.0, 60.0]

[parameters.E_value]
value = 200000.0
"""


def test_neml2_card(tmp_path):
    pytest.importorskip("neml2")
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "model.i").write_text(
        (MODELS_DIR / "neml2" / "perzyna-voce.i").read_text())
    spec = load_card(write(tmp_path, NEML2))
    assert (spec.model, spec.backend, spec.system) == ("neml2", "neml2", "eq_sys")
    assert spec.file == tmp_path / "inputs" / "model.i"
    assert list(spec.parameters) == ["sy_value", "E_value"]
    assert spec.calibrated == ("sy_value",) and spec.fixed == ("E_value",)
    assert spec.neml2_shapes == {"sy_value": (), "E_value": ()} and not spec.compile
    spec = load_card(write(tmp_path, edit(
        'file = "inputs/model.i"\n',
        'file = "inputs/model.i"\nsystem = "eq_sys"\nname = "neml2"\ncompile = true\n', NEML2)))
    assert spec.system == "eq_sys" and spec.compile
    assert bad(tmp_path, edit('file = "inputs/model.i"\n', 'file = "inputs/model.i"\nsystem = "sys"\n',
                              NEML2)) == (
        f"card.toml: [model] cannot load system 'sys' from {tmp_path / 'inputs/model.i'}: "
        f"KeyError: 'No [EquationSystems/sys] found in {tmp_path / 'inputs/model.i'}'")


def test_neml2_card_errors(tmp_path):
    assert bad(tmp_path, NEML2) == (
        f"card.toml: [model] file 'inputs/model.i' not found (looked for {tmp_path / 'inputs/model.i'})")
    assert bad(tmp_path, edit('file = "inputs/model.i"\n', "", NEML2)) == (
        "card.toml: [model] backend = 'neml2' needs file (the NEML2 input file)")
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "model.i").write_text("[Models]\n")
    assert bad(tmp_path, edit('backend = "neml2"\n', 'backend = "neml2"\nname = "chaboche"\n', NEML2)) == (
        "card.toml: [model] name 'chaboche' conflicts with backend = 'neml2' (omit name)")
    assert bad(tmp_path, edit("[parameters.E_value]\nvalue = 200000.0\n", "[parameters.E_value]\n",
                              NEML2)) == (
        "card.toml: [parameters.E_value] needs value (fixed) or bounds and prior (calibrated)")


# ----------------------------------------------------------------------------- bad cards


def test_missing_file(tmp_path):
    with pytest.raises(BadInput, match=r"nothere\.toml: file not found$"):
        load_card(tmp_path / "nothere.toml")


def test_malformed_toml(tmp_path):
    message = bad(tmp_path, edit("n_chunk = 10", "n_chunk = = 10"))
    assert message.startswith("card.toml: invalid TOML: ")
    assert message.endswith("(at line 5, column 11)")


def test_not_utf8(tmp_path):
    path = tmp_path / "card.toml"
    path.write_bytes(b'[model]\nname = "\xff"\n')
    with pytest.raises(BadInput, match=r"card\.toml: invalid TOML: "):
        load_card(path)


def test_unknown_table(tmp_path):
    assert bad(tmp_path, BASE + "[priors]\nx = 1\n") == (
        "card.toml: unknown table [priors] (allowed: [model], [solver], [parameters], [noise])")


def test_missing_model_table(tmp_path):
    assert bad(tmp_path, edit('[model]\nname = "perzyna-voce"\n', "")) == (
        "card.toml: missing [model] table")


def test_model_not_a_table(tmp_path):
    assert bad(tmp_path, edit('[model]\nname = "perzyna-voce"\n', 'model = "perzyna-voce"\n')) == (
        "card.toml: [model] must be a table, got 'perzyna-voce'")


def test_missing_model_name(tmp_path):
    assert bad(tmp_path, edit('name = "perzyna-voce"\n', "")) == (
        "card.toml: [model] missing name (built-in models: chaboche, perzyna-voce, voce-jc, voce-jc-thermal)")


def test_unknown_model(tmp_path):
    assert bad(tmp_path, edit('"perzyna-voce"', '"perzyna"')) == (
        "card.toml: [model] unknown model 'perzyna' (built-in models: chaboche, perzyna-voce, voce-jc, voce-jc-thermal)")


def test_model_name_must_be_a_string(tmp_path):
    assert bad(tmp_path, edit('"perzyna-voce"', "3")) == (
        "card.toml: [model] name must be a string, got 3")


def test_unknown_backend(tmp_path):
    assert bad(tmp_path, edit('name = "perzyna-voce"\n', 'name = "perzyna-voce"\nbackend = "abaqus"\n')) == (
        "card.toml: [model] backend 'abaqus' must be one of 'builtin', 'neml2'")


def test_file_only_for_neml2(tmp_path):
    assert bad(tmp_path, edit('name = "perzyna-voce"\n', 'name = "perzyna-voce"\nsystem = "s"\n')) == (
        "card.toml: [model] system applies only to backend = 'neml2'")


def test_unknown_parameter(tmp_path):
    assert bad(tmp_path, BASE + "[parameters.C]\nvalue = 1.0\n") == (
        "card.toml: [parameters.C] unknown parameter for perzyna-voce "
        "(parameters: E, sy, Rinf, d, eta, n)")


def test_missing_parameter(tmp_path):
    assert bad(tmp_path, edit("[parameters.n]\nvalue = 3.0\n", "")) == (
        "card.toml: [parameters.n] missing: every parameter of perzyna-voce needs at least a value")


def test_missing_parameters_table(tmp_path):
    text = BASE[: BASE.index("[parameters.E]")] + "[noise]\nprior_scale = 5.0\n"
    assert bad(tmp_path, text) == (
        "card.toml: [parameters.E] missing: every parameter of perzyna-voce needs at least a value")


def test_parameter_not_a_table(tmp_path):
    assert bad(tmp_path, edit("[parameters.n]\nvalue = 3.0\n", "[parameters]\nn = 3.0\n")) == (
        "card.toml: [parameters.n] must be a table, got 3.0")


def test_parameter_with_neither_value_nor_bounds_and_prior(tmp_path):
    assert bad(tmp_path, edit("[parameters.n]\nvalue = 3.0\n", "[parameters.n]\n")) == (
        "card.toml: [parameters.n] needs value (fixed) or bounds and prior (calibrated)")


@pytest.mark.parametrize("drop", ["bounds = [100.0, 600.0]\n", "prior = [250.0, 60.0]\n"])
def test_bounds_without_prior_and_prior_without_bounds(tmp_path, drop):
    assert bad(tmp_path, edit(drop, "")) == (
        "card.toml: [parameters.sy] a calibrated parameter needs both bounds and prior "
        "(a fixed one only value)")


@pytest.mark.parametrize("bounds", ["[600.0, 100.0]", "[250, 250]"])
def test_inverted_or_equal_bounds(tmp_path, bounds):
    lo, hi = (float(x) for x in bounds.strip("[]").split(","))
    assert bad(tmp_path, edit("bounds = [100.0, 600.0]", f"bounds = {bounds}")) == (
        f"card.toml: [parameters.sy] bounds [{lo!r}, {hi!r}] must be increasing")


@pytest.mark.parametrize("centre", ["50.0", "600.0", "700.0"])
def test_prior_centre_outside_bounds(tmp_path, centre):
    assert bad(tmp_path, edit("prior = [250.0, 60.0]", f"prior = [{centre}, 60.0]")) == (
        f"card.toml: [parameters.sy] prior centre {centre} is not inside bounds [100.0, 600.0]")


@pytest.mark.parametrize("sd", ["0.0", "-1.0"])
def test_prior_sd_not_positive(tmp_path, sd):
    assert bad(tmp_path, edit("prior = [250.0, 60.0]", f"prior = [250.0, {sd}]")) == (
        f"card.toml: [parameters.sy] prior sd must be positive, got {sd}")


@pytest.mark.parametrize("key, raw", [
    ("bounds", "[100.0]"), ("bounds", '[100.0, "600"]'), ("prior", "250.0"), ("prior", "[250.0, nan]"),
])
def test_bounds_and_prior_must_be_two_finite_numbers(tmp_path, key, raw):
    old = {"bounds": "bounds = [100.0, 600.0]", "prior": "prior = [250.0, 60.0]"}[key]
    message = bad(tmp_path, edit(old, f"{key} = {raw}"))
    assert message.startswith(f"card.toml: [parameters.sy] {key} must be two finite numbers, got ")


def test_value_must_be_a_finite_number(tmp_path):
    assert bad(tmp_path, edit("value = 3.0", 'value = "3"')) == (
        "card.toml: [parameters.n] value must be a finite number, got '3'")
    assert bad(tmp_path, edit("value = 3.0", "value = inf")) == (
        "card.toml: [parameters.n] value must be a finite number, got inf")
    assert bad(tmp_path, edit("value = 3.0", "value = true")) == (
        "card.toml: [parameters.n] value must be a finite number, got True")


@pytest.mark.parametrize("value", ["5.0", "2000.0"])
def test_initial_value_outside_bounds(tmp_path, value):
    assert bad(tmp_path, edit("value = 400.0", f"value = {value}")) == (
        f"card.toml: [parameters.eta] value {value} is not inside bounds [10.0, 2000.0]")


@pytest.mark.parametrize("varies", ["fixed", "specimens", "global"])
def test_varies_must_be_specimen_or_shared(tmp_path, varies):
    assert bad(tmp_path, edit('varies = "shared"', f'varies = "{varies}"')) == (
        f"card.toml: [parameters.Rinf] varies {varies!r} must be 'specimen' or 'shared'")


@pytest.mark.parametrize("key", ['varies = "specimen"', "spread = 0.1"])
def test_varies_and_spread_need_a_calibrated_parameter(tmp_path, key):
    text = edit("[parameters.n]\nvalue = 3.0\n", f"[parameters.n]\nvalue = 3.0\n{key}\n")
    assert bad(tmp_path, text) == (
        f"card.toml: [parameters.n] {key.split()[0]} applies only to a calibrated parameter "
        "(give bounds and prior)")


@pytest.mark.parametrize("spread", ["0.0", "-0.1"])
def test_spread_not_positive(tmp_path, spread):
    assert bad(tmp_path, edit("spread = 0.2", f"spread = {spread}")) == (
        f"card.toml: [parameters.d] spread must be positive, got {spread}")


@pytest.mark.parametrize("key, old", [("n_chunk", "n_chunk = 10"), ("substeps", "substeps = 2")])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_solver_counts_at_least_one(tmp_path, key, old, value):
    assert bad(tmp_path, edit(old, f"{key} = {value}")) == (
        f"card.toml: [solver] {key} must be at least 1, got {value}")


def test_solver_counts_must_be_integers(tmp_path):
    assert bad(tmp_path, edit("n_chunk = 10", "n_chunk = 10.0")) == (
        "card.toml: [solver] n_chunk must be an integer, got 10.0")


@pytest.mark.parametrize("key, old", [("rtol", "rtol = 1e-6"), ("atol", "atol = 1e-9")])
@pytest.mark.parametrize("value", ["0.0", "-1e-08"])
def test_tolerances_positive(tmp_path, key, old, value):
    assert bad(tmp_path, edit(old, f"{key} = {value}")) == (
        f"card.toml: [solver] {key} must be positive, got {value}")


@pytest.mark.parametrize("value", ["0.0", "-5.0"])
def test_noise_prior_scale_positive(tmp_path, value):
    assert bad(tmp_path, edit("prior_scale = 5.0", f"prior_scale = {value}")) == (
        f"card.toml: [noise] prior_scale must be positive, got {value}")


@pytest.mark.parametrize("old, new, message", [
    ('name = "perzyna-voce"', 'name = "perzyna-voce"\nnmae = "x"',
     "[model] unknown key 'nmae' (allowed: name, backend, file, system, compile, softening, "
     "temperatures)"),
    ("n_chunk = 10", "n_chunk = 10\nnchunk = 5\nsub_steps = 2",
     "[solver] unknown key 'nchunk', 'sub_steps' (allowed: n_chunk, scheme, tolerance, substeps, transient_substeps, rtol, atol)"),
    ("prior_scale = 5.0", "prior_scale = 5.0\nscale = 1.0",
     "[noise] unknown key 'scale' (allowed: prior_scale)"),
    ("spread = 0.2", "sprad = 0.2",
     "[parameters.d] unknown key 'sprad' (allowed: value, bounds, prior, varies, spread)"),
])
def test_unknown_keys(tmp_path, old, new, message):
    assert bad(tmp_path, edit(old, new)) == f"card.toml: {message}"
