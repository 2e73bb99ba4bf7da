"""The thermal model voce-jc-thermal: its rate against the equations of docs/models.md, its
analytic Jacobians against autograd, the path's temperature in the residual, the card's
defaults and softening settings, the checks of ``bayescal check``, heating in the adiabatic
and isothermal limits, and recovery of known parameters from three rates and two initial
temperatures."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from bayescal.card import load_card, load_model, parse_card
from bayescal.check import check_model, piecewise_path
from bayescal.data import Experiments
from bayescal.errors import BadInput
from bayescal.fit import fit
from bayescal.hierarchy import Hierarchy
from bayescal.inference.laplace import MAPConfig
from bayescal.material import StrainControlledResidual, get_model, piecewise_linear
from bayescal.integrate import SolverOptions, integrate, refine, simulate

CARD = "models/voce-jc-thermal.toml"
BASE = dict(E=200000.0, sy=300.0, Rinf=700.0, d=4.0, C=0.02, eps0=1e-3,
            beta=0.9, rho_c=3.95, rate_ad=1.0, T0=293.15)
JC = dict(BASE, Tref=293.15, Tmelt=1673.0, m=0.7)
KNOTS = (293.0, 500.0, 800.0)
PL = dict(BASE, softening_0=1.0, softening_1=0.8, softening_2=0.5)


def _model_and_params(softening):
    if softening == "johnson-cook":
        return get_model("voce-jc-thermal"), {k: torch.tensor(v) for k, v in JC.items()}
    model = get_model("voce-jc-thermal", softening="piecewise-linear", temperatures=KNOTS)
    return model, {k: torch.tensor(v) for k, v in PL.items()}


def plastic_states(n, generator, sign=1.0):
    """States (sigma, R, heating) in plastic flow at plastic rates from 1e-4 to about 1e4 /s,
    heated by 0-400 K (so that piecewise-linear softening crosses its knots)."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)  # noqa: E731
    R = u(0.0, 600.0)
    heating = u(0.0, 400.0)
    over = u(0.0, 0.3)  # |sigma| / flow - 1, flow evaluated below at the state's temperature
    return R, heating, over


def _flow_states(model, p, n, generator, sign, temperature=None):
    R, heating, over = plastic_states(n, generator)
    state = torch.stack([torch.zeros(n), R, heating], dim=-1)
    T = model.temperature(state, p, temperature)
    g, _ = model.softening_factor(T, p)
    state[:, 0] = sign * (1 + over) * g * (p["sy"] + R)
    return state


def expected_rate(state, P, g):
    """docs/models.md's equations of voce-jc-thermal, written out per sample."""
    out = []
    for (s, R, _), gi in zip(state.tolist(), g.tolist()):
        flow = gi * (P["sy"] + R)
        f = abs(s) / flow - 1.0
        pdot = P["eps0"] * math.expm1(f / P["C"]) if f > 0 else 0.0
        chi = pdot / (pdot + P["rate_ad"])
        out.append([-P["E"] * pdot * math.copysign(1.0, s), P["d"] * (P["Rinf"] - R) * pdot,
                    chi * P["beta"] * abs(s) * pdot / P["rho_c"]])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rate_matches_the_equations(sign):
    gen = torch.Generator().manual_seed(1)
    model, p = _model_and_params("johnson-cook")
    state = _flow_states(model, p, 64, gen, sign)
    rate, _ = model.rate(state, p)
    T = JC["T0"] + state[:, 2]
    star = (T - JC["Tref"]) / (JC["Tmelt"] - JC["Tref"])
    g = 1 - star ** JC["m"]
    torch.testing.assert_close(rate, expected_rate(state, {**JC}, g), rtol=1e-10, atol=1e-12)
    assert (rate[:, 2] > 0).all()  # plastic work heats
    # piecewise-linear: the same equations with g interpolated between the knots
    model, p = _model_and_params("piecewise-linear")
    state = _flow_states(model, p, 64, gen, sign)
    T = PL["T0"] + state[:, 2]
    g = torch.from_numpy(np.interp(T.numpy(), KNOTS, [1.0, 0.8, 0.5]))
    rate, _ = model.rate(state, p)
    torch.testing.assert_close(rate, expected_rate(state, PL, g), rtol=1e-10, atol=1e-12)


def test_piecewise_linear_interpolates_and_holds_beyond_the_knots():
    T = torch.tensor([100.0, 293.0, 396.5, 500.0, 650.0, 900.0], dtype=torch.float64)
    y = [torch.tensor(1.0), torch.tensor(0.8), torch.tensor(0.5)]
    value, slope = piecewise_linear(T, KNOTS, y)
    torch.testing.assert_close(value, torch.tensor([1.0, 1.0, 0.9, 0.8, 0.65, 0.5],
                                                   dtype=torch.float64))
    torch.testing.assert_close(slope, torch.tensor([0.0, 0.0, -0.2 / 207, -0.3 / 300,
                                                    -0.3 / 300, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("softening", ["johnson-cook", "piecewise-linear"])
@pytest.mark.parametrize("with_path_temperature", [False, True])
def test_rate_jacobian_matches_autograd(softening, with_path_temperature):
    gen = torch.Generator().manual_seed(2)
    model, p = _model_and_params(softening)
    temperature = (250.0 + 300.0 * torch.rand(64, generator=gen, dtype=torch.float64)
                   if with_path_temperature else None)
    state = torch.cat([_flow_states(model, p, 32, gen, s, None if temperature is None
                                    else temperature[:32] if s > 0 else temperature[32:])
                       for s in (1.0, -1.0)])
    _, jac = model.rate(state, p, temperature)
    auto = torch.func.vmap(torch.func.jacrev(
        lambda s, T: model.rate(s, p, T)[0]), in_dims=(0, None if temperature is None else 0))(
        state, temperature)
    scale = auto.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
    assert ((jac - auto).abs() / scale).max().item() <= 1e-8
    # not vacuous: heating depends on stress and on temperature through the flow rule
    assert (auto[:, 2, 0].abs() > 0).all() and (auto[:, 0, 2].abs() > 0).any()


def test_residual_reads_the_path_temperature_at_the_stage_times():
    """Radau IIA stages see the path's temperature linear in time within the step, and the
    residual's block Jacobian matches autograd with a temperature force."""
    gen = torch.Generator().manual_seed(4)
    model, p = _model_and_params("johnson-cook")
    batch = 6
    params = {k: v.expand(batch) for k, v in p.items()}
    factory = StrainControlledResidual(model, params, "radau-iia")
    x = torch.cat([_flow_states(model, p, batch, gen, 1.0) for _ in range(2)], dim=-1)
    x_full = torch.stack([x, x + 1.0])  # one step, two stages
    time = torch.tensor([0.0, 1e-4], dtype=torch.float64)[:, None, None].expand(2, batch, 1)
    strain = torch.tensor([0.1, 0.1 + 0.36], dtype=torch.float64)[:, None, None].expand(
        2, batch, 1)
    temperature = torch.stack([torch.full((batch, 1), 300.0), torch.full((batch, 1), 400.0)])
    R, J = factory.evaluate_raw(x_full, (time, strain, temperature))
    c = factory.scheme.c
    stage_T = torch.tensor([300.0 + 100.0 * c[0], 400.0], dtype=torch.float64)
    rates = torch.stack([model.rate(x_full[1][:, 3 * i:3 * i + 3], p, stage_T[i].expand(batch))[0]
                         for i in range(2)], dim=1)
    a = torch.tensor(factory.scheme.a, dtype=torch.float64)
    coupling = torch.tensor([JC["E"], 0.0, 0.0], dtype=torch.float64)
    expected = (x_full[1].unflatten(-1, (2, 3)) - x_full[0][:, None, 3:]
                - 1e-4 * torch.einsum("ij,bjn->bin", a, rates)
                - torch.tensor(c, dtype=torch.float64)[:, None] * 0.36 * coupling)
    torch.testing.assert_close(R[0], expected.flatten(-2), rtol=1e-12, atol=1e-9)
    full = torch.autograd.functional.jacobian(
        lambda y: factory.evaluate_raw(y, (time, strain, temperature))[0], x_full)
    b = torch.arange(batch)
    diag = full[0, b, :, 1, b, :]
    assert ((J.diag[0] - diag).abs() / diag.abs().amax(dim=-1, keepdim=True)).max() <= 1e-8
    # isothermal residual: the temperature force changes nothing for voce-jc
    iso = get_model("voce-jc")
    iso_params = {k: params[k] for k in iso.parameters}
    iso_factory = StrainControlledResidual(iso, iso_params, "radau-iia")
    x2 = x_full.unflatten(-1, (2, 3))[..., :2].flatten(-2)
    assert len(iso.forces(time[..., 0], strain[..., 0], temperature[..., 0])) == 2
    assert len(model.forces(time[..., 0], strain[..., 0], temperature[..., 0])) == 3
    assert torch.isfinite(iso_factory.evaluate_raw(x2, (time, strain))[0]).all()


PL_CARD = """[model]
name = "voce-jc-thermal"
softening = "piecewise-linear"
temperatures = [293.0, 500.0, 800.0]
[parameters.E]
value = 200000.0
[parameters.sy]
value = 300.0
[parameters.Rinf]
value = 700.0
[parameters.d]
value = 4.0
[parameters.C]
value = 0.02
[parameters.eps0]
value = 1e-3
[parameters.softening]
bounds = [0.1, 1.5]
prior = [0.8, 0.2]
varies = "shared"
"""


def pl_card_with_ordinates() -> str:
    """PL_CARD with ``Rinf`` calibrated and the ordinates set one by one: 1 at 293 K (fixed),
    calibrated at 500 K, 0.5 at 800 K (fixed), so that g has a slope at every temperature
    between the knots."""
    return PL_CARD.replace("""[parameters.softening]
bounds = [0.1, 1.5]
prior = [0.8, 0.2]
varies = "shared"
""", """[parameters.softening_0]
value = 1.0
[parameters.softening_1]
bounds = [0.3, 1.5]
prior = [0.9, 0.2]
varies = "shared"
[parameters.softening_2]
value = 0.5
""").replace("[parameters.Rinf]\nvalue = 700.0", "[parameters.Rinf]\nbounds = [100.0, 2000.0]"
             "\nprior = [700.0, 200.0]\nvaries = 'shared'")


def test_card_defaults_softening_and_bad_settings(tmp_path):
    spec = load_card(CARD)
    assert spec.calibrated == ("sy", "Rinf", "d", "C", "m")
    # a card may leave out parameters with documented defaults: fixed at them
    spec = parse_card(PL_CARD, tmp_path / "card.toml")
    assert spec.calibrated == ("softening_0", "softening_1", "softening_2")
    assert {k: spec.parameters[k].value for k in ("beta", "rho_c", "rate_ad", "T0")} == {
        "beta": 0.9, "rho_c": 3.95, "rate_ad": 1.0, "T0": 293.15}
    assert load_model(spec).temperatures == KNOTS
    bad = {
        'softening = "piecewise-linear"\ntemperatures = [500.0, 293.0]': "increasing",
        'softening = "arrhenius"': "softening 'arrhenius' must be one of",
        'temperatures = [293.0, 500.0]\nsoftening = "johnson-cook"': "only to piecewise",
    }
    for setting, message in bad.items():
        card = PL_CARD.replace('softening = "piecewise-linear"\ntemperatures = [293.0, 500.0, '
                               '800.0]', setting)
        with pytest.raises(BadInput, match=message):
            parse_card(card, tmp_path / "card.toml")
    with pytest.raises(BadInput, match="only to a thermal model"):
        parse_card(open("models/voce-jc.toml").read().replace(
            'name = "voce-jc"', 'name = "voce-jc"\nsoftening = "johnson-cook"'), "x.toml")
    with pytest.raises(BadInput, match=r"\[parameters.rho_c\] unknown parameter for voce-jc"):
        parse_card(open("models/voce-jc.toml").read() + "[parameters.rho_c]\nvalue = 4.0\n",
                   "x.toml")


def _load(rates, temperatures, strain=0.25, points=30):
    """Monotonic tension to ``strain`` at each (rate, initial temperature)."""
    columns = []
    for rate in rates:
        t, e = piecewise_path(((strain / rate, strain),), points)
        columns.append((t, e))
    time = torch.stack([c[0] for c in columns for _ in temperatures], dim=1)
    strain_ = torch.stack([c[1] for c in columns for _ in temperatures], dim=1)
    T = torch.tensor([T for _ in rates for T in temperatures], dtype=torch.float64)
    ids = tuple(f"r{r:g}-T{T:g}" for r in rates for T in temperatures)
    mask = torch.ones_like(time, dtype=torch.bool)
    labels = {"strain_rate": tuple(float(r) for r in rates for _ in temperatures),
              "temperature0": tuple(float(T) for _ in rates for T in temperatures)}
    return Experiments(ids, time, strain_, None, mask, T.expand_as(time).contiguous(), labels,
                       "synthetic")


@pytest.mark.parametrize("softening", ["johnson-cook", "piecewise-linear"])
def test_bayescal_check_passes_at_high_rate_and_temperature(softening, tmp_path):
    load = _load((1000.0, 1e-2), (297.0, 473.0), points=40)
    spec = (load_card(CARD) if softening == "johnson-cook"
            else parse_card(pl_card_with_ordinates(), tmp_path / "card.toml"))
    results = check_model(spec, load)
    assert all(r.passed for r in results), [(r.name, r.value, r.detail) for r in results]
    byname = {r.name: r for r in results}
    assert byname["jacobian"].value <= 1e-8 and byname["adjoint-gradient"].value <= 1e-5


def test_heating_is_adiabatic_at_high_rates_and_absent_at_low_ones():
    model = get_model("voce-jc-thermal")
    p = {k: v for k, v in JC.items()}
    load = _load((1e-3, 3000.0), (293.15,), strain=0.3, points=60)
    options = SolverOptions(substeps=8)
    grid = refine(load.time, load.strain, torch.full((60,), 8), load.temperature)
    states, report = integrate(model, p, grid, options, adjoint=False)
    assert report.n_failed == 0
    sigma, heating = states[..., 0], states[..., 2]
    # plastic work: sum of sigma d eps_p, eps_p = strain - sigma / E (trapezoid on the fine grid)
    eps_p = grid.strain - sigma / JC["E"]
    work = (0.5 * (sigma[1:] + sigma[:-1]) * torch.diff(eps_p, dim=0)).sum(dim=0)
    adiabatic = JC["beta"] * work / JC["rho_c"]
    assert 40.0 < float(heating[-1, 1]) < 80.0  # tens of K at 3000 /s
    # chi = p_dot / (p_dot + 1 /s) is 0.9997 at 3000 /s: nearly all the work heats the bar
    assert abs(float(heating[-1, 1] / adiabatic[1]) - 1.0) < 2e-3
    assert float(heating[-1, 0]) < 1e-3 * float(adiabatic[0])  # chi ~ 1e-3 at 1e-3 /s
    # the data's temperature column sets the initial temperature; without it, T0
    no_T = dataclasses.replace(load, temperature=None)
    s1, _ = simulate(model, p, load.time, load.strain, options, adjoint=False,
                     temperature=load.temperature)
    s0, _ = simulate(model, p, no_T.time, no_T.strain, options, adjoint=False)
    torch.testing.assert_close(s1, s0, rtol=0, atol=1e-9)
    hot, _ = simulate(model, p, load.time, load.strain, options, adjoint=False,
                      temperature=load.temperature + 200.0)
    g = 1 - (200.0 / (JC["Tmelt"] - JC["Tref"])) ** JC["m"]
    assert float(hot[-1, 0] / s1[-1, 0]) == pytest.approx(g, rel=0.02)


TRUTH = dict(sy=260.0, Rinf=850.0, d=3.2, C=0.015, m=0.8)


def recovery_card() -> str:
    """The shipped card with every calibrated parameter shared (six specimens of one
    material) and ``m`` kept from 0.5 up (below, Johnson-Cook's slope near Tref is steep
    enough to make Newton fail at the planned steps)."""
    text = open(CARD).read().replace('varies = "specimen"', 'varies = "shared"')
    text = "\n".join(line for line in text.splitlines() if not line.startswith("spread"))
    return text.replace("bounds = [0.1, 3.0]\nprior = [1.0, 0.5]",
                        "bounds = [0.5, 2.0]\nprior = [1.0, 0.3]")


def synthetic_map(spec, load, truth, noise=3.0, seed=11):
    """The MAP of ``spec`` on ``load`` simulated at ``truth`` (shared by every specimen)
    with Gaussian noise of sd ``noise``."""
    blank = dataclasses.replace(load, stress=torch.zeros_like(load.time))
    clean = Hierarchy(spec, blank).solve_stress(
        {k: torch.full((load.n_specimens,), v, dtype=torch.float64) for k, v in truth.items()},
        adjoint=False)[0].T
    gen = torch.Generator().manual_seed(seed)
    data = dataclasses.replace(blank, stress=clean + noise * torch.randn(
        clean.shape, generator=gen, dtype=torch.float64))
    return fit(spec, data, method="map", map_config=MAPConfig(iterations=60), draws=10, seed=0,
               progress=False).posterior


@pytest.mark.slow
def test_recovers_parameters_from_three_rates_and_two_temperatures(tmp_path):
    """Synthetic tests at 1e-3, 10 and 2000 /s, each starting at 297 and 473 K, with 3 MPa
    noise: the MAP recovers the softening exponent m (informed by the hot tests and by
    adiabatic heating at the high rate), the rate sensitivity and the hardening."""
    spec = parse_card(recovery_card(), tmp_path / "card.toml")
    assert spec.parameters["m"].bounds == (0.5, 2.0) and spec.shared == tuple(TRUTH)
    load = _load((1e-3, 10.0, 2000.0), (297.0, 473.0), strain=0.3, points=40)
    post = synthetic_map(spec, load, TRUTH)
    for name, truth in TRUTH.items():
        got = float(post[name].mean())
        assert got == pytest.approx(truth, rel=0.05), (name, got, truth)
    assert float(post["noise_sd"].mean()) == pytest.approx(3.0, rel=0.2)


def test_recovers_a_piecewise_linear_softening_ordinate(tmp_path):
    """Temperature-dependent parameters: tests at 297 and 473 K (quasi-static, so no heating)
    recover the ordinate at 500 K of piecewise-linear softening (the one at 293 K fixed at 1,
    which makes the flow stress at 297 K inform Rinf alone)."""
    spec = parse_card(pl_card_with_ordinates(), tmp_path / "card.toml")
    assert spec.calibrated == ("Rinf", "softening_1")
    load = _load((1e-3,), (297.0, 473.0), strain=0.2, points=30)
    truth = {"Rinf": 820.0, "softening_1": 0.7}
    post = synthetic_map(spec, load, truth)
    for name, value in truth.items():
        assert float(post[name].mean()) == pytest.approx(value, rel=0.02), name
