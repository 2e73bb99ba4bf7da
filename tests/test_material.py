"""Built-in material models: rates against the contract equations, analytic Jacobians
against autograd, and the backward Euler residual's block Jacobian against autograd."""

from __future__ import annotations

import math

import pytest
import torch

from bayescal.material import MODELS, StrainControlledResidual, get_model

PARAMS = {
    "perzyna-voce": dict(E=200000.0, sy=200.0, Rinf=150.0, d=30.0, eta=100.0, n=5.0),
    "chaboche": dict(E=200000.0, sy=150.0, Rinf=100.0, d=20.0, C=20000.0, g=200.0,
                     eta=100.0, n=4.0),
    "voce-jc": dict(E=200000.0, sy=300.0, Rinf=700.0, d=4.0, C=0.02, eps0=1e-3),
}
N_SAMPLES = 64


def _params(name):
    return {k: torch.tensor(v) for k, v in PARAMS[name].items()}


def random_states(name, regime, sign, generator, n=N_SAMPLES):
    """States ``(n, n_state)`` strictly in the elastic or plastic regime, with the sign of the
    effective stress (``sigma - X`` for chaboche) given by ``sign``."""
    P = PARAMS[name]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)  # noqa: E731
    R = u(0.0, 0.95 * P["Rinf"])
    flow = P["sy"] + R
    if name == "voce-jc":
        ratio = u(1e-3, 0.25) if regime == "plastic" else u(0.0, 0.98)
        sigma = sign * flow * (1.0 + ratio) if regime == "plastic" else sign * flow * ratio
        return torch.stack([sigma, R], dim=-1)
    over = u(0.5, 150.0) if regime == "plastic" else -u(2.0, 0.95 * flow.min().item())
    eff = sign * (flow + over)
    if name == "perzyna-voce":
        return torch.stack([eff, R], dim=-1)
    X = u(-0.9, 0.9) * P["C"] / P["g"]  # nonzero backstress of either sign
    return torch.stack([eff + X, R, X], dim=-1)


def contract_rate(name, state, P):
    """The contract's equations (design.md), written out per component, at zero strain rate."""
    out = []
    for row in state.tolist():
        if name == "voce-jc":
            s, R = row
            f = abs(s) / (P["sy"] + R) - 1.0
            pdot = P["eps0"] * math.expm1(f / P["C"]) if f > 0 else 0.0
            out.append([-P["E"] * pdot * math.copysign(1.0, s), P["d"] * (P["Rinf"] - R) * pdot])
            continue
        s, R = row[:2]
        X = row[2] if name == "chaboche" else 0.0
        f = abs(s - X) - (P["sy"] + R)
        pdot = (f / P["eta"]) ** P["n"] if f > 0 else 0.0
        direction = math.copysign(1.0, s - X)
        rates = [-P["E"] * pdot * direction, P["d"] * (P["Rinf"] - R) * pdot]
        if name == "chaboche":
            rates.append(P["C"] * pdot * direction - P["g"] * X * pdot)
        out.append(rates)
    return torch.tensor(out)


CASES = [(name, regime, sign) for name in PARAMS for regime in ("elastic", "plastic")
         for sign in (1.0, -1.0)]


def test_registry_has_the_contract_models():
    assert set(MODELS) == {"perzyna-voce", "chaboche", "voce-jc", "voce-jc-thermal"}
    assert get_model("perzyna-voce").parameters == ("E", "sy", "Rinf", "d", "eta", "n")
    assert get_model("chaboche").parameters == ("E", "sy", "Rinf", "d", "C", "g", "eta", "n")
    assert get_model("voce-jc").parameters == ("E", "sy", "Rinf", "d", "C", "eps0")
    for name in PARAMS:
        assert get_model(name).state_names[0] == "stress"


@pytest.mark.parametrize("name,regime,sign", CASES)
def test_rate_matches_contract_equations(name, regime, sign):
    gen = torch.Generator().manual_seed(1)
    model, p = get_model(name), _params(name)
    state = random_states(name, regime, sign, gen)
    rate, _ = model.rate(state, p)
    expected = contract_rate(name, state, PARAMS[name])
    if regime == "elastic":
        assert torch.equal(rate, torch.zeros_like(rate))
    else:
        # every sample is really plastic, flowing in the direction of the effective stress
        assert (rate[:, 0] * sign < 0).all()
    torch.testing.assert_close(rate, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,regime,sign", CASES)
def test_rate_jacobian_matches_autograd(name, regime, sign):
    gen = torch.Generator().manual_seed(2)
    model, p = get_model(name), _params(name)
    state = random_states(name, regime, sign, gen)
    _, jac = model.rate(state, p)
    auto = torch.func.vmap(torch.func.jacrev(lambda s: model.rate(s, p)[0]))(state)
    assert jac.shape == (N_SAMPLES, model.n_state, model.n_state)
    scale = auto.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1.0)
    err = ((jac - auto).abs() / scale).max().item()
    assert err <= 1e-8, err
    if regime == "plastic":
        # the check is not vacuous: d(stress rate)/d(stress) = -E dp/dsigma < 0
        assert (auto[:, 0, 0] < 0).all()
    else:
        assert torch.equal(jac, torch.zeros_like(jac))


@pytest.mark.parametrize("name", list(PARAMS))
def test_rate_jacobian_with_per_sample_parameters(name):
    """Parameters of shape (batch,) broadcast against the state batch."""
    gen = torch.Generator().manual_seed(3)
    model = get_model(name)
    state = torch.cat([random_states(name, "plastic", s, gen, 16) for s in (1.0, -1.0)])
    # scale every parameter but sy (which alone decides the regime) by up to +-5% per sample
    p = {k: torch.full((32,), v) * (1.0 if k == "sy" else 0.95 + 0.1 * torch.rand(32, generator=gen))
         for k, v in PARAMS[name].items()}
    _, jac = model.rate(state, p)
    auto = torch.func.vmap(torch.func.jacrev(lambda s, pi: model.rate(s, pi)[0]))(state, p)
    assert (auto[:, 0, 0] < 0).all()
    scale = auto.abs().amax(dim=(-2, -1), keepdim=True)
    assert ((jac - auto).abs() / scale).max().item() <= 1e-8


@pytest.mark.parametrize("name", list(PARAMS))
def test_residual_block_jacobian_matches_autograd(name):
    """``evaluate_raw``'s diagonal (dR_k/dx_k) and subdiagonal (dR_k/dx_{k-1}) blocks against
    autograd of the residual, over a chunk of 3 steps mixing elastic and plastic states."""
    gen = torch.Generator().manual_seed(4)
    model = get_model(name)
    batch, steps = 8, 3
    states = []
    for _ in range(steps + 1):
        parts = [random_states(name, regime, sign, gen, batch // 4)
                 for regime in ("elastic", "plastic") for sign in (1.0, -1.0)]
        states.append(torch.cat(parts))
    x_full = torch.stack(states)  # (steps + 1, batch, n)
    params = {k: torch.full((batch,), v) for k, v in PARAMS[name].items()}
    factory = StrainControlledResidual(model, params)
    time = torch.cumsum(torch.rand(steps + 1, batch, 1, generator=gen) * 0.5 + 1e-3, dim=0)
    strain = torch.randn(steps + 1, batch, 1, generator=gen) * 1e-3
    forces = (time, strain)

    R, J = factory.evaluate_raw(x_full, forces)
    # the residual itself: R_k = x_k - x_{k-1} - dt rate(x_k) - E (strain_k - strain_{k-1}) e_0
    rate, _ = model.rate(x_full[1:], params)
    coupling = torch.zeros(model.n_state)
    coupling[0] = PARAMS[name]["E"]
    expected_R = (x_full[1:] - x_full[:-1] - torch.diff(time, dim=0) * rate
                  - torch.diff(strain, dim=0) * coupling)
    torch.testing.assert_close(R, expected_R, rtol=1e-12, atol=1e-9)

    full = torch.autograd.functional.jacobian(lambda x: factory.evaluate_raw(x, forces)[0],
                                              x_full)  # (steps, batch, n, steps + 1, batch, n)
    b = torch.arange(batch)
    for k in range(steps):
        diag_auto = full[k, b, :, k + 1, b, :]
        sub_auto = full[k, b, :, k, b, :]
        scale = diag_auto.abs().amax(dim=(-2, -1), keepdim=True)
        assert ((J.diag[k] - diag_auto).abs() / scale).max().item() <= 1e-8
        torch.testing.assert_close(J.sub[k], sub_auto, rtol=0, atol=0)
        # nothing couples different specimens, nor steps further than one apart
        mask = torch.ones_like(full[k], dtype=torch.bool)
        mask[b, :, k + 1, b, :] = False
        mask[b, :, k, b, :] = False
        assert torch.count_nonzero(full[k][mask]) == 0


def test_strain_coupling_is_E_on_stress_only():
    for name in PARAMS:
        model = get_model(name)
        like = torch.zeros(4, 5, model.n_state)
        c = model.strain_coupling({"E": torch.full((5,), 1234.0)}, like)
        assert c.shape == (4, 5, model.n_state)
        assert torch.equal(c[..., 0], torch.full((4, 5), 1234.0))
        assert torch.count_nonzero(c[..., 1:]) == 0
