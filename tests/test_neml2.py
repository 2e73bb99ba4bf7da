"""The NEML2 backend (bayescal.neml2_backend): cards, agreement with the built-in model, the
adjoint against finite differences, chunked solves over a wide rate and temperature range,
and simulate + fit + predict through the same paths as the built-in models.

Tests that need neml2 take the ``neml2`` fixture and skip cleanly where it is not installed.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bayescal import check
from bayescal.card import load_card, load_model, parse_card
from bayescal.data import read_load_path
from bayescal.errors import BadInput
from bayescal.integrate import Grid, SolverOptions, integrate, simulate

ROOT = Path(__file__).resolve().parents[1]
NEML2_MODELS = ROOT / "models" / "neml2"
PV_CARD = NEML2_MODELS / "perzyna-voce.toml"
KM_CARD = NEML2_MODELS / "kocks-mecking.toml"


@pytest.fixture(scope="module")
def neml2():
    return pytest.importorskip("neml2")


def message(path: Path, text: str) -> str:
    """The one-line message of the BadInput that loading card ``text`` raises."""
    path.write_text(text)
    with pytest.raises(BadInput) as info:
        load_card(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def km_text(fixed: dict[str, float] = {}, substeps: tuple[int, int] | None = None) -> str:
    """The Kocks-Mecking card's text with some parameters fixed and other sub-steps."""
    text = KM_CARD.read_text()
    for name, value in fixed.items():
        start = text.index(f"[parameters.{name}]")
        end = text.index("\n\n", start)
        text = text[:start] + f"[parameters.{name}]\nvalue = {value}" + text[end:]
    if substeps is not None:
        text = text.replace("substeps = 2\ntransient_substeps = 8",
                            f"substeps = {substeps[0]}\ntransient_substeps = {substeps[1]}")
    return text


def write_load(path: Path, conditions, n_points: int, max_strain: float) -> Path:
    """One monotonic tension path per (rate /s, temperature K) condition."""
    rows = [["specimen", "time", "strain", "temperature"]]
    for i, (rate, temperature) in enumerate(conditions):
        for k in range(n_points + 1):
            strain = max_strain * k / n_points
            rows.append([f"c{i}", repr(strain / rate), repr(strain), repr(temperature)])
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


#: 10 conditions: 5 rates from 1e-6 to 1 /s at 310 and at 1190 K
CONDITIONS = [(rate, temperature) for rate in torch.logspace(-6, 0, 5).tolist()
              for temperature in (310.0, 1190.0)]


# --------------------------------------------------------------------------- cards and errors


def test_kocks_mecking_card_splits_vector_parameters(neml2):
    spec = load_card(KM_CARD)
    assert spec.neml2_shapes == {"A_value": (), "B_value": (), "C_value": (),
                                 "R_ordinate": (4,), "d_ordinate": (4,)}
    assert spec.calibrated == ("A_value", "B_value", "C_value", *(f"R_ordinate_{i}" for i in
                                                                 range(4)),
                               *(f"d_ordinate_{i}" for i in range(4)))
    assert spec.varying == tuple(f"R_ordinate_{i}" for i in range(4))
    r3 = spec.parameters["R_ordinate_3"]
    assert (r3.bounds, r3.prior, r3.spread) == ((10.0, 600.0), (180.0, 120.0), 0.05)
    model = load_model(spec)
    assert model.parameters == spec.calibrated and model.n_state == 8 and model.needs_temperature


def test_a_vector_component_reaches_its_table_ordinate(neml2):
    """R_ordinate_3 (R at 1200 K) changes stress at 1190 K, and not at 310 K."""
    spec = load_card(KM_CARD)
    model = load_model(spec)
    n = 4
    time = torch.linspace(0, 100.0, 21)[:, None].expand(-1, n)
    strain = time * 1e-3
    temperature = torch.tensor([310.0, 310.0, 1190.0, 1190.0]).expand(21, -1)
    params = check.check_parameters(spec)
    params["R_ordinate_3"] = torch.tensor([180.0, 300.0, 180.0, 300.0])
    stress, report = simulate(model, params, time, strain, spec.solver, adjoint=False,
                              temperature=temperature)
    assert report.n_failed == 0
    assert float((stress[:, 1] - stress[:, 0]).abs().max()) == 0.0
    assert float(stress[-1, 3] - stress[-1, 2]) > 10.0  # MPa, 0.97 of 120 MPa more saturation


def test_card_errors(tmp_path, neml2):
    (tmp_path / "model.i").write_text((NEML2_MODELS / "perzyna-voce.i").read_text())
    card = PV_CARD.read_text().replace('file = "perzyna-voce.i"', 'file = "model.i"')
    path = tmp_path / "card.toml"
    known = ("E_value, Rinf_value, d_value, elastic_strain_rate_offset, "
             "elastic_strain_rate_weight_0, elastic_strain_rate_weight_1, elasticity_nu, "
             "eta_value, n_value, overstress_offset, overstress_weight_0, overstress_weight_1, "
             "overstress_weight_2, sy_value, theta0_scaling")
    assert message(path, card.replace("[parameters.sy_value]", "[parameters.sy]")) == (
        f"{path}: [parameters.sy] unknown parameter of system 'eq_sys' in model.i "
        f"(parameters: {known})")
    assert message(path, card.replace('file = "model.i"', 'file = "missing.i"')) == (
        f"{path}: [model] file 'missing.i' not found (looked for {tmp_path / 'missing.i'})")
    assert message(path, card.replace('[model]\n', '[model]\ncompile = "yes"\n')) == (
        f"{path}: [model] compile must be true or false, got 'yes'")
    (tmp_path / "km.i").write_text(KM_CARD.with_suffix(".i").read_text())
    km = KM_CARD.read_text().replace('file = "kocks-mecking.i"', 'file = "km.i"')
    assert message(path, km.replace('prior = [-5.4, 0.4]\nvaries = "shared"',
                                    'prior = [-5.4, 0.4]\nvaries = "specimen"')) == (
        f"{path}: [parameters.C_value] varies = 'specimen' needs bounds from 0 up, got "
        "[-8.0, -3.0] (its spread is a coefficient of variation): make it 'shared'")
    builtin = (ROOT / "models" / "perzyna-voce.toml").read_text()
    assert message(path, builtin.replace('[model]\n', '[model]\ncompile = true\n')) == (
        f"{path}: [model] compile applies only to backend = 'neml2'")
    # a system that is not in uniaxial mixed control: strain-controlled elasticity
    (tmp_path / "elastic.i").write_text(ELASTIC)
    assert message(path, '[model]\nbackend = "neml2"\nfile = "elastic.i"\n') == (
        f"{path}: [model] system 'eq_sys' of elastic.i has force(s) strain that bayescal "
        "cannot drive (it gives t, temperature, fixed_values, control)")


ELASTIC = """\
[Models]
  [strain_rate]
    type = SR2VariableRate
    variable = 'strain'
  []
  [elasticity]
    type = LinearIsotropicElasticity
    coefficients = '200000 0.3'
    coefficient_types = 'YOUNGS_MODULUS POISSONS_RATIO'
    rate_form = true
    strain = 'strain'
  []
  [integrate_stress]
    type = SR2BackwardEulerTimeIntegration
    variable = 'stress'
  []
  [residual]
    type = ComposedModel
    models = 'strain_rate elasticity integrate_stress'
  []
[]

[EquationSystems]
  [eq_sys]
    type = NonlinearSystem
    model = 'residual'
    unknowns = 'stress'
  []
[]
"""


def test_a_card_without_neml2_installed_says_so(tmp_path, monkeypatch):
    """Runs whether or not neml2 is installed: the import is made to fail."""
    monkeypatch.setitem(sys.modules, "neml2", None)
    path = tmp_path / "card.toml"
    (tmp_path / "perzyna-voce.i").write_text((NEML2_MODELS / "perzyna-voce.i").read_text())
    assert message(path, PV_CARD.read_text()) == (
        f"{path}: [model] backend = 'neml2' needs the neml2 package: "
        "pip install 'bayescal[neml2]'")


def test_temperature_is_required_by_a_model_that_uses_it(neml2):
    model = load_model(load_card(KM_CARD))
    time = torch.linspace(0, 10.0, 5)[:, None]
    with pytest.raises(BadInput) as info:
        simulate(model, check.check_parameters(load_card(KM_CARD)), time, time * 1e-3,
                 adjoint=False)
    assert str(info.value) == (f"{KM_CARD.with_suffix('.i')}: system 'eq_sys' is driven by "
                               "temperature: the data "
                               "(or load path) need a temperature column (K)")


def test_compile_option_reaches_neml2_compile(neml2, monkeypatch):
    """``[model] compile`` and the library argument call neml2.compile on the wrapped system
    (compiling itself takes minutes: benchmarks/neml2_backend.py measures it)."""
    compiled = []
    monkeypatch.setattr(neml2, "compile", lambda target: compiled.append(target) or target)
    spec = load_card(PV_CARD)
    assert not load_model(spec).compiled and compiled == []
    model = load_model(spec, compile=True)
    assert model.compiled and compiled == [model._factory]
    assert load_model(replace(spec, compile=True)).compiled and len(compiled) == 2


# ----------------------------------------------------- the same physics as the built-in model


def test_perzyna_voce_agrees_with_the_builtin_model(neml2):
    """The NEML2 file of perzyna-voce against the built-in model with backward Euler on the
    same sub-steps: three specimens on the informative path (two rates, a hold, an unload),
    chunked, to the Newton tolerance."""
    neml2_spec, builtin = load_card(PV_CARD), load_card(ROOT / "models" / "perzyna-voce.toml")
    time, strain = check.informative_path(10)
    time, strain = time[:, None].repeat(1, 3), strain[:, None].repeat(1, 3)
    builtin_params = dict(E=2e5, sy=torch.tensor([250.0, 320.0, 180.0]),
                          Rinf=torch.tensor([200.0, 120.0, 300.0]),
                          d=torch.tensor([15.0, 30.0, 8.0]), eta=torch.tensor([300.0, 150.0, 500.0]),
                          n=3.0)
    neml2_params = {f"{k}_value": v for k, v in builtin_params.items()}
    ours, report = simulate(load_model(neml2_spec), neml2_params, time, strain,
                            neml2_spec.solver, adjoint=False)
    # the same discretisation: backward Euler on the NEML2 card's sub-steps
    euler = replace(builtin.solver, scheme="backward-euler",
                    substeps=neml2_spec.solver.substeps,
                    transient_substeps=neml2_spec.solver.transient_substeps)
    reference, _ = simulate(load_model(builtin), builtin_params, time, strain, euler,
                            adjoint=False)
    assert report.n_failed == 0
    peak = float(reference.abs().max())
    error = float((ours - reference).abs().max())
    print(f"NEML2 vs built-in perzyna-voce: max |difference| {error:.3g} MPa of {peak:.4g} MPa")
    assert 300.0 < peak and error < 1e-8


def test_jacobian_and_adjoint_checks_on_the_neml2_model(neml2):
    """bayescal's checks on the NEML2 perzyna-voce: NEML2's assembled Jacobian against
    autograd, and the chunked adjoint gradient against finite differences."""
    spec = load_card(PV_CARD)
    model = load_model(spec)
    params = check.check_parameters(spec)
    time, strain = check.informative_path(5)
    load = check.CheckLoad(time[:, None], strain[:, None], torch.ones(len(time), 1, dtype=bool))
    jacobian = check.check_jacobian(model, params, load, spec.solver)
    adjoint = check.check_adjoint(model, params, spec.calibrated, load, spec.solver)
    print(f"jacobian {jacobian.value:.3g}; adjoint {adjoint.value:.3g} ({adjoint.detail})")
    assert jacobian.value < 1e-12
    assert adjoint.value < 1e-7 and "kink" not in adjoint.detail


def test_solves_keep_their_parameters_until_their_adjoint(neml2):
    """Two solves through one model before one backward pass (as Pyro does for several
    particles) give each solve's own gradient."""
    spec = load_card(PV_CARD)
    model = load_model(spec)
    time, strain = check.informative_path(3)
    time, strain = time[:, None], strain[:, None]

    def gradient(values, together=None):
        params = {k: torch.tensor([v]) for k, v in check.check_parameters(spec).items()}
        params.update({k: torch.tensor([v], requires_grad=True) for k, v in values.items()})
        stress = simulate(model, params, time, strain, spec.solver)[0]
        return params, stress.square().sum()

    alone = []
    for sy in (250.0, 320.0):
        params, loss = gradient({"sy_value": sy, "eta_value": 300.0})
        loss.backward()
        alone.append(torch.cat([params["sy_value"].grad, params["eta_value"].grad]))
    (p1, l1), (p2, l2) = (gradient({"sy_value": sy, "eta_value": 300.0}) for sy in (250.0, 320.0))
    (l1 + l2).backward()
    together = [torch.cat([p["sy_value"].grad, p["eta_value"].grad]) for p in (p1, p2)]
    assert float((alone[0] - alone[1]).abs().min()) > 1.0
    for a, b in zip(alone, together):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_adjoint_gradient_of_the_kocks_mecking_model(neml2):
    """The adjoint through the Kocks-Mecking system (flow switch, complementarity, tables)
    against central differences, at two temperatures and two rates."""
    spec = load_card(KM_CARD)
    model = load_model(spec)
    params = check.check_parameters(spec)
    n = 12
    time = torch.stack([torch.linspace(0, 0.05 / rate, n + 1) for rate in (1e-4, 1e-2)] * 2, 1)
    strain = torch.linspace(0, 0.05, n + 1)[:, None].expand(-1, 4)
    temperature = torch.tensor([400.0, 400.0, 1000.0, 1000.0]).expand(n + 1, -1)
    load = check.CheckLoad(time, strain, torch.ones(n + 1, 4, dtype=bool), temperature)
    options = replace(spec.solver, substeps=1, transient_substeps=4)
    result = check.check_adjoint(model, params, spec.calibrated, load, options)
    print(f"Kocks-Mecking adjoint: {result.value:.3g} ({result.detail})")
    # measured: 1.3e-5 for A_value, 2.1e-6 for B_value, at most 2.7e-9 for the others, the
    # same for finite-difference steps from 1e-7 to 1e-4: A and B are as accurate as the
    # solve (1e-3 with solves at 1e-9), whose one residual norm mixes MPa and 1/s
    assert result.value < 1e-4


# ----------------------------------------------------------------------------- robustness


def test_chunked_solves_over_the_tutorial_range_match_a_sequential_solve(neml2):
    """NEML2's statistical tutorial conditions: 100 steps to 25 % strain, 50 specimens at
    rates 1e-6 to 1 /s and 310 to 1190 K. Chunked solves (one-step first chunk,
    step-extrapolating predictor, tolerances 1e-8, retries) give no NaN and the stress of a
    sequential solve at tolerances 1e-10."""
    spec = load_card(KM_CARD)
    model = load_model(spec)
    rates, temperatures = torch.logspace(-6, 0, 5), torch.linspace(310.0, 1190.0, 10)
    rate = rates.repeat_interleave(10)
    strain = torch.linspace(0, 0.25, 100)[:, None].expand(-1, 50).contiguous()
    grid = Grid(strain / rate, strain, torch.arange(100),
                temperatures.repeat(5).expand(100, -1).contiguous())
    params = check.check_parameters(spec)
    reference, report = integrate(model, params, grid, SolverOptions(n_chunk=1, rtol=1e-10,
                                                                     atol=1e-10), adjoint=False)
    assert report.n_failed == 0
    reference = model.stress(reference)
    for n_chunk in (10, 50):
        states, report = integrate(model, params, grid, replace(spec.solver, n_chunk=n_chunk),
                                   adjoint=False)
        stress = model.stress(states)
        nan = int(torch.isnan(states).any(-1).any(0).sum())
        error = float((stress - reference).abs().max())
        print(f"n_chunk {n_chunk}: {nan} NaN specimens, {report.retries} retries, "
              f"max |stress - sequential| {error:.3g} MPa")
        assert nan == 0 and report.n_failed == 0
        assert error < 1e-3


# ------------------------------------------------------------- simulate, fit, predict


def test_simulate_fit_and_predict_at_ten_rate_and_temperature_conditions(tmp_path, neml2):
    """Synthetic data from the Kocks-Mecking card at 10 conditions (1e-6 to 1 /s, 310 and
    1190 K), a MAP fit (delta guide) of C and the four R ordinates (specimen by specimen),
    and population predictions: no NaN anywhere, and the fit brings the rms residual down to
    the noise."""
    from bayescal.fit import fit
    from bayescal.inference.laplace import MAPConfig
    from bayescal.predict import predict
    from bayescal.synthetic import simulate_experiments

    text = km_text(fixed={"A_value": -8.7, "B_value": -0.75, "d_ordinate": 18.0},
                   substeps=(1, 4))
    spec = parse_card(text, KM_CARD)
    assert spec.calibrated == ("C_value", *(f"R_ordinate_{i}" for i in range(4)))
    load = read_load_path(write_load(tmp_path / "load.csv", CONDITIONS, 10, 0.1))
    data = simulate_experiments(spec, load, seed=3, noise_sd=2.0).experiments
    assert not torch.isnan(data.stress).any()

    idata = fit(spec, data, method="map", map_config=MAPConfig(iterations=3), draws=20,
                progress=False)
    predictive = torch.as_tensor(idata.posterior_predictive["stress"].values)
    assert not torch.isnan(predictive).any()
    assert torch.isfinite(torch.as_tensor(idata.log_likelihood["stress"].values)).all()
    observed = data.stress.T
    start = simulate(load_model(spec), check.check_parameters(spec), data.time, data.strain,
                     spec.solver, adjoint=False, temperature=data.temperature)[0].T
    rms_start = float((start - observed)[:, 1:].square().mean().sqrt())
    rms_fit = float((predictive.mean((0, 1)) - observed)[:, 1:].square().mean().sqrt())
    print(f"rms residual at the prior centre {rms_start:.3g} MPa, after MAP {rms_fit:.3g} MPa "
          f"(noise 2 MPa); noise_sd {float(idata.posterior['noise_sd'].mean()):.3g}")
    assert rms_fit < 3.0 < rms_start

    prediction = predict(idata, load, draws=5, seed=1)
    assert prediction.failed_draws == 0 and not torch.isnan(prediction.stress).any()
