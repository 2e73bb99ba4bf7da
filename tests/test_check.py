"""Model verification (bayescal.check): every check's number on every built-in model, each
check failing when what it verifies is broken, and the informative load path."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bayescal import check
from bayescal.card import load_card
from bayescal.check import (
    CheckResult,
    check_adjoint,
    check_load,
    check_model,
    check_parameters,
    informative_path,
)
from bayescal.data import read_load_path
from bayescal.material import PerzynaVoce, get_model

ROOT = Path(__file__).resolve().parents[1]
CARDS = sorted((ROOT / "models").glob("*.toml"))
NAMES = ["jacobian", "adjoint-gradient", "chunking", "integration", "response"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, as the CLI uses: tiny tensors run several times slower with more."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_load(path: Path, points_per_segment: int) -> Path:
    time, strain = informative_path(points_per_segment)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["time", "strain"])
        writer.writerows(zip(map(repr, time.tolist()), map(repr, strain.tolist()), strict=True))
    return path


@pytest.fixture(scope="module")
def short_load(tmp_path_factory):
    """The informative path with 10 points a segment (cheaper than the default 30)."""
    return read_load_path(write_load(tmp_path_factory.mktemp("load") / "short.csv", 10))


def test_informative_path_has_the_designed_segments():
    time, strain = informative_path()
    assert time.shape == strain.shape == (151,) and time.dtype == torch.float64
    assert time[0] == 0 and strain[0] == 0 and (torch.diff(time) > 0).all()
    rate = torch.diff(strain) / torch.diff(time)
    segments = rate.reshape(5, 30)
    assert torch.allclose(segments, segments[:, :1], rtol=1e-9, atol=1e-12)  # constant per segment
    expected = torch.tensor([1e-3, 1e-1, 0.0, -1e-2, 1e-2])
    assert torch.allclose(segments[:, 0], expected, rtol=1e-9, atol=1e-12)
    ends = strain[30::30]
    assert torch.allclose(ends, torch.tensor([0.015, 0.03, 0.03, 0.027, 0.045]), atol=1e-15)
    assert float(time[90] - time[60]) == pytest.approx(50.0)  # the hold
    assert informative_path(10)[0].shape == (51,)


def test_shipped_example_load_is_the_informative_path():
    load = read_load_path(ROOT / "docs" / "examples" / "informative-load.csv")
    time, strain = informative_path()
    assert load.specimens == ("path",) and load.stress is None
    assert torch.allclose(load.time[:, 0], time, rtol=1e-11, atol=0)
    assert torch.allclose(load.strain[:, 0], strain, rtol=1e-11, atol=1e-16)


def test_check_parameters_are_prior_centres_or_fixed_values():
    spec = load_card(ROOT / "models" / "voce-jc.toml")
    assert check_parameters(spec) == dict(E=200000.0, sy=300.0, Rinf=700.0, d=4.0, C=0.02,
                                          eps0=1e-3)


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.stem)
def test_solver_checks_pass_on_a_short_path(card, short_load):
    """Every card on the informative path with 10 points a segment. (The default path, 30 a
    segment, where the integration check passes too, is checked through the CLI.)"""
    results = check_model(load_card(card), short_load)
    assert [r.name for r in results] == NAMES
    values = {r.name: r.value for r in results}
    for r in results:
        assert isinstance(r, CheckResult)
        assert r.tolerance == check.TOLERANCES[r.name]
        assert r.passed == (r.value <= r.tolerance)
    # far inside their tolerances, not just under them
    assert values["jacobian"] <= 1e-12
    # central differences at the check's step (1e-6 relative) carry about 1e-7 of their
    # own error on voce-jc-thermal (3e-9 at a step of 1e-5): the gradient's bound is theirs
    assert values["adjoint-gradient"] <= 2e-7
    # recorded points three times coarser than the default path: the planned grid keeps the
    # error far below the noise, reported in MPa (rms and max) with the observed order
    integration = results[3]
    assert 0 < values["integration"] < 0.05
    assert f"rms {values['integration']:.3g} MPa" in integration.detail
    assert "max" in integration.detail and "51 recorded points" in integration.detail
    order = float(integration.detail.split("observed order ")[1])
    assert order >= 1.8, integration.detail
    # most steps are inelastic, except that after the hold's relaxation the state sits on
    # the yield surface (f ~ 1e-13), where a step's flow is zero or not by rounding: the
    # hold's ~190 sub-steps count as elastic for voce-jc-thermal and not for voce-jc
    assert results[4].passed and 0 < values["response"] < 0.75


def test_checks_run_on_several_padded_paths(tmp_path):
    """A load file with specimens of different lengths: padded steps are left out."""
    rows = [["specimen", "time", "strain"]]
    for sid, n, rate in (("a", 40, 1e-3), ("b", 25, 1e-1)):
        rows += [[sid, repr(k * 0.03 / rate / (n - 1)), repr(k * 0.03 / (n - 1))] for k in range(n)]
    path = tmp_path / "two.csv"
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    load = read_load_path(path)
    assert load.n_points == (40, 25)
    results = check_model(load_card(ROOT / "models" / "perzyna-voce.toml"), load)
    assert all(r.passed for r in results[:3]), results
    assert "65 recorded points" in results[3].detail
    assert " steps x 2 path(s)" in results[0].detail
    assert all(r.passed for r in results), results


def test_a_broken_jacobian_fails_the_jacobian_and_gradient_checks(monkeypatch, short_load):
    rate = PerzynaVoce.rate

    def broken(self, state, p):
        r, jac = rate(self, state, p)
        return r, jac * 1.001

    monkeypatch.setattr(PerzynaVoce, "rate", broken)
    results = {r.name: r for r in check_model(load_card(ROOT / "models" / "perzyna-voce.toml"),
                                              short_load)}
    assert not results["jacobian"].passed
    assert 5e-4 < results["jacobian"].value <= 1.001e-3  # 0.1 % of the rate part of a block row
    assert not results["adjoint-gradient"].passed  # the adjoint solves with the analytic Jacobian
    assert results["chunking"].passed  # Newton still converges to the same states


def test_tolerances_decide_pass_or_fail(monkeypatch, short_load):
    monkeypatch.setitem(check.TOLERANCES, "integration", 1e-3)
    results = {r.name: r for r in check_model(load_card(ROOT / "models" / "chaboche.toml"),
                                              short_load)}
    assert results["integration"].value > 1e-3 and not results["integration"].passed
    assert results["chunking"].passed


def test_integration_error_shrinks_with_tolerance_and_substeps(short_load):
    spec = load_card(ROOT / "models" / "perzyna-voce.toml")
    model, params, load = get_model(spec.model), check_parameters(spec), check_load(short_load)
    coarse = check.check_integration(model, params, load, spec.solver)
    finer = check.check_integration(model, params, load,
                                    replace(spec.solver, tolerance=spec.solver.tolerance / 8))
    assert finer.value < 0.25 * coarse.value, (coarse.value, finer.value)
    # backward Euler is first order: four times the sub-steps, about a quarter of the error
    euler = replace(spec.solver, scheme="backward-euler", substeps=4)
    coarse = check.check_integration(model, params, load, euler)
    finer = check.check_integration(model, params, load,
                                    replace(euler, substeps=16, transient_substeps=64))
    assert 0.15 <= finer.value / coarse.value <= 0.35, (coarse.value, finer.value)
    assert "observed order 0.9" in coarse.detail or "observed order 1.0" in coarse.detail, (
        coarse.detail)


def test_response_check_refuses_zero_or_elastic_response(short_load):
    spec = load_card(ROOT / "models" / "perzyna-voce.toml")
    model, params = get_model(spec.model), check_parameters(spec)
    # a tolerance so loose that Newton accepts its zero first guess
    loose = replace(spec.solver, atol=1e8, substeps=2, predictor="zero")
    result = check.check_response(model, params, check_load(short_load), loose)
    assert not result.passed and result.value == 1.0
    assert result.detail.startswith("the stress is zero at every recorded point")
    # a load that stays far below yield
    time, strain = check.piecewise_path([(1.0, 1e-4)], 20)
    elastic = check.CheckLoad(time[:, None], strain[:, None],
                              torch.ones(21, 1, dtype=torch.bool))
    result = check.check_response(model, params, elastic, spec.solver)
    assert not result.passed and result.value == 1.0
    assert "hardly leaves the elastic range" in result.detail
    assert "max |stress| 20 MPa" in result.detail


def test_gradient_at_a_kink_is_compared_with_one_sided_differences():
    """voce-jc's flow rule has a kink at the yield point (p_dot' jumps from 0 to eps0/C). With
    sy = 300, E = 200000 the informative path hits the yield strain 0.0015 exactly, so the
    discrete solution is not differentiable in sy there: the adjoint gives one one-sided
    derivative, central differences their mean."""
    model = get_model("voce-jc")
    params = dict(E=200000.0, sy=300.0, Rinf=700.0, d=4.0, C=0.02, eps0=1e-3)
    result = check_adjoint(model, params, ("sy", "Rinf"), check_load(), check.SolverOptions())
    assert result.passed, result
    assert "sy" in result.detail and "kink" in result.detail.split("Rinf")[0]
    assert "kink" not in result.detail.split("Rinf")[1]
    # off the kink, plain central differences agree
    params["sy"] = 300.123
    result = check_adjoint(model, params, ("sy", "Rinf"), check_load(), check.SolverOptions())
    assert result.passed and "kink" not in result.detail, result


def test_all_fixed_card_has_nothing_to_differentiate(tmp_path, short_load):
    card = tmp_path / "fixed.toml"
    card.write_text('[model]\nname = "perzyna-voce"\n' + "".join(
        f"[parameters.{k}]\nvalue = {v}\n" for k, v in
        dict(E=200000.0, sy=250.0, Rinf=200.0, d=15.0, eta=300.0, n=3.0).items()))
    results = {r.name: r for r in check_model(load_card(card), short_load)}
    assert results["adjoint-gradient"].passed and results["adjoint-gradient"].value == 0.0
    assert results["jacobian"].passed and results["chunking"].passed
