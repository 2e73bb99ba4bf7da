"""The chunked solver: adjoint gradients, chunking, retries, accuracy against an independent
high-accuracy integration of the contract equations, and the physics those equations imply."""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import informative_path, piecewise_path

from bayescal.material import get_model
from bayescal.reference import radau_stress
from bayescal.integrate import (
    Grid,
    SolverOptions,
    adjoint_chunk_steps,
    chunk_steps,
    integrate,
    integrate_unrolled,
    fixed_substeps,
    plan_substeps,
    refine,
    simulate,
    solve_recorded,
)

PARAMS = {
    "perzyna-voce": dict(E=200000.0, sy=200.0, Rinf=150.0, d=30.0, eta=100.0, n=5.0),
    "chaboche": dict(E=200000.0, sy=150.0, Rinf=100.0, d=20.0, C=20000.0, g=200.0,
                     eta=100.0, n=4.0),
    "voce-jc": dict(E=200000.0, sy=300.0, Rinf=200.0, d=20.0, C=0.02, eps0=1e-3),
}
CALIBRATED = {
    "perzyna-voce": ("sy", "Rinf", "d", "eta", "n"),
    "chaboche": ("sy", "Rinf", "d", "C", "g", "eta", "n"),
    "voce-jc": ("sy", "Rinf", "d", "C"),
}
# fixed sub-steps: every solve of a gradient check must share one grid (a planned grid
# depends on the parameters)
TIGHT = SolverOptions(rtol=1e-11, atol=1e-11, n_chunk=10, substeps=2, transient_substeps=8)
# Gradient checks move voce-jc's yield strain off the integration grid: at sy = 300 the yield
# strain 1.5e-3 is a grid point, where stress has a kink in sy and central differences average
# the two one-sided slopes.
GRADIENT_PARAMS = {**PARAMS, "voce-jc": {**PARAMS["voce-jc"], "sy": 310.0}}


# --------------------------------------------------------------------------------------------
# An independent reference: scipy's Radau on the contract equations (bayescal.reference),
# cached by problem.


def radau_reference(name, P, time, strain, tol=1e-10):
    """Exact (to ~tol) stress at the points of a piecewise-linear strain path."""
    time, strain = np.asarray(time, float), np.asarray(strain, float)
    key = (name, tuple(sorted(P.items())), time.tobytes(), strain.tobytes(), tol)
    if key not in _REFERENCES:
        _REFERENCES[key] = radau_stress(name, P, time, strain, tol)
    return _REFERENCES[key]


_REFERENCES: dict = {}


def rms(a):
    return float(np.sqrt(np.mean(np.square(a))))


# --------------------------------------------------------------------------------------------
# 2. adjoint gradients


def _weights(n):
    return torch.linspace(0.5, 1.5, n)[:, None]


def _gradient(name, options):
    """Gradient of sum(w * stress) by the adjoint, on the informative path (10 points/segment)."""
    model, P, cal = get_model(name), GRADIENT_PARAMS[name], CALIBRATED[name]
    t, e = informative_path(10)
    p = {k: torch.tensor(v, requires_grad=k in cal) for k, v in P.items()}
    stress, report = simulate(model, p, t, e, options)
    assert report.n_failed == 0 and torch.isfinite(stress).all()
    (_weights(t.shape[0]) * stress).sum().backward()
    return torch.stack([p[k].grad for k in cal])


@functools.lru_cache(maxsize=None)
def _adjoint_gradient(name):
    return _gradient(name, TIGHT)


@pytest.mark.parametrize("name", list(PARAMS))
def test_adjoint_gradient_matches_finite_differences(name):
    model, P, cal = get_model(name), GRADIENT_PARAMS[name], CALIBRATED[name]
    g_adj = _adjoint_gradient(name)
    # central differences, every perturbation a specimen of one batched solve
    t, e = informative_path(10, batch=2 * len(cal))
    pb = {k: torch.full((2 * len(cal),), v) for k, v in P.items()}
    steps = []
    for i, k in enumerate(cal):
        h = 1e-6 * P[k]
        pb[k][2 * i] += h
        pb[k][2 * i + 1] -= h
        steps.append(h)
    stress, report = simulate(model, pb, t, e, TIGHT, adjoint=False)
    assert report.n_failed == 0
    loss = (_weights(t.shape[0]) * stress).sum(0)
    g_fd = torch.stack([(loss[2 * i] - loss[2 * i + 1]) / (2 * h) for i, h in enumerate(steps)])
    rel = ((g_fd - g_adj).abs() / g_adj.abs()).max().item()
    print(f"{name}: adjoint vs central FD, max relative error {rel:.2e}")
    assert (g_adj.abs() > 1e-3).all()  # every calibrated parameter matters on this path
    assert rel <= 1e-6


@pytest.mark.parametrize("name", list(PARAMS))
def test_adjoint_gradient_matches_unrolled_autograd(name):
    model, P, cal = get_model(name), GRADIENT_PARAMS[name], CALIBRATED[name]
    g_adj = _adjoint_gradient(name)
    t, e = informative_path(10)
    grid = refine(t, e, fixed_substeps(t, e, TIGHT))
    p = {k: torch.tensor(v, requires_grad=k in cal) for k, v in P.items()}
    states = integrate_unrolled(model, p, grid, TIGHT)
    (_weights(t.shape[0]) * states[grid.recorded, :, 0]).sum().backward()
    g_un = torch.stack([p[k].grad for k in cal])
    rel = ((g_un - g_adj).abs() / g_adj.abs()).max().item()
    assert rel <= 1e-8, rel


@pytest.mark.parametrize("name", ["perzyna-voce", "voce-jc"])
def test_the_adjoint_in_chunks_of_any_length_gives_the_same_gradient(name, monkeypatch):
    """The adjoint is a linear block system: in the Newton chunks' 10 steps, in chunks of 7
    or in one chunk, the gradient agrees to rounding; pyzag is given the asked length."""
    from pyzag import nonlinear

    chunks = []
    generator = nonlinear.StepGenerator
    monkeypatch.setattr(nonlinear, "StepGenerator",
                        lambda block, **kw: chunks.append(block) or generator(block, **kw))
    newton, seven, whole = (_gradient(name, replace(TIGHT, adjoint_chunk=k))
                            for k in (10, 7, 10**6))
    assert chunks == [10, 10, 10, 7, 10, 10**6]  # (forward, adjoint) for each solve
    for other in (seven, whole):
        assert ((other - newton).abs() / newton.abs()).max().item() <= 1e-12


@pytest.mark.parametrize("batch, n_chunk, steps", [(1, 20, 8192), (64, 20, 128), (256, 10, 40),
                                                    (1024, 5, 40), (16, 400, 512),
                                                    (10, 400, 819)])
def test_the_adjoint_chunk_follows_the_batch_and_an_explicit_value_wins(batch, n_chunk, steps):
    assert adjoint_chunk_steps(batch, n_chunk) == steps
    automatic = SolverOptions(n_chunk=None if n_chunk == chunk_steps(batch) else n_chunk)
    assert automatic.for_batch(batch).adjoint_chunk == steps
    assert SolverOptions(adjoint_chunk=7).for_batch(batch).adjoint_chunk == 7


# --------------------------------------------------------------------------------------------
# 3. chunk sizes; 4. the cached-trajectory hazard


def _chunk_disagreement(name, options):
    """Largest stress difference of n_chunk 10 and 50 from n_chunk 1, relative to max |stress|."""
    model, P = get_model(name), PARAMS[name]
    t, e = informative_path(10)
    out = {}
    for n_chunk in (1, 10, 50):
        stress, report = simulate(model, P, t, e, replace(options, n_chunk=n_chunk),
                                  adjoint=False)
        assert report.n_failed == 0
        out[n_chunk] = stress
    scale = out[1].abs().max()
    rel = max(((out[n] - out[1]).abs().max() / scale).item() for n in (10, 50))
    print(f"{name}: n_chunk 10/50 vs 1, max relative stress difference {rel:.1e}")
    return rel


@pytest.mark.parametrize("name", list(PARAMS))
def test_chunk_sizes_agree_at_tight_tolerance(name):
    assert _chunk_disagreement(name, SolverOptions(rtol=1e-12, atol=1e-10)) <= 1e-8




@pytest.mark.parametrize("name", ["perzyna-voce", "chaboche"])
def test_chunk_sizes_agree_with_default_options(name):
    assert _chunk_disagreement(name, SolverOptions()) <= 1e-8


@pytest.mark.parametrize("batch, steps", [(1, 20), (127, 20), (128, 10), (511, 10), (512, 5),
                                          (4096, 5)])
def test_the_automatic_chunk_follows_the_batch_and_a_card_value_wins(batch, steps):
    assert chunk_steps(batch) == steps
    assert SolverOptions().for_batch(batch).n_chunk == steps
    assert SolverOptions(n_chunk=7).for_batch(batch).n_chunk == 7


def test_a_large_batch_is_solved_in_short_chunks_as_accurately(monkeypatch):
    """512 paths without a card's n_chunk: pyzag is given chunks of 5 steps, and stress
    equals a sequential solve's within 1e-8 of its largest value."""
    from pyzag import nonlinear

    chunks = []
    generator = nonlinear.StepGenerator
    monkeypatch.setattr(nonlinear, "StepGenerator",
                        lambda block, **kw: chunks.append(block) or generator(block, **kw))
    model, P = get_model("perzyna-voce"), PARAMS["perzyna-voce"]
    t, e = informative_path(10, batch=512)
    p = {k: torch.full((512,), v) * torch.linspace(0.9, 1.1, 512) for k, v in P.items()}
    automatic, report = simulate(model, p, t, e, SolverOptions(substeps=2), adjoint=False)
    assert report.n_failed == 0 and chunks == [5]
    sequential, _ = simulate(model, p, t, e, SolverOptions(substeps=2, n_chunk=1), adjoint=False)
    assert ((automatic - sequential).abs().max() / sequential.abs().max()).item() <= 1e-8


def test_two_forward_solves_then_one_backward():
    """Two solves with different parameters, then one backward of the summed loss, give the
    gradients of two separate backward passes (no solver state is shared between solves)."""
    model = get_model("perzyna-voce")
    t, e = piecewise_path([(20.0, 0.02), (20.0, 0.02)], 15)  # load, then relax
    w = _weights(t.shape[0])

    def losses(theta):
        first = dict(PARAMS["perzyna-voce"], sy=theta[0], Rinf=theta[1])
        second = dict(PARAMS["perzyna-voce"], sy=1.2 * theta[0], Rinf=0.5 * theta[1], eta=150.0)
        return [(w * simulate(model, p, t, e)[0]).sum() for p in (first, second)]

    theta = torch.tensor([200.0, 150.0], requires_grad=True)
    l1, l2 = losses(theta)
    (l1 + l2).backward()
    together = theta.grad.clone()

    separate = []
    for which in range(2):
        theta = torch.tensor([200.0, 150.0], requires_grad=True)
        losses(theta)[which].backward()
        separate.append(theta.grad.clone())
    # the two solves' gradients really differ, so mixing up trajectories would show
    assert ((separate[0] - separate[1]).abs() > 0.1 * separate[0].abs()).any()
    torch.testing.assert_close(together, separate[0] + separate[1], rtol=1e-10, atol=0.0)


# --------------------------------------------------------------------------------------------
# 5. physics


@pytest.mark.parametrize("name", list(PARAMS))
def test_elastic_slope_is_E(name):
    model, P = get_model(name), PARAMS[name]
    end = 2.0 * P["sy"] / P["E"]  # yield half way
    t, e = piecewise_path([(end / 1e-3, end)], 60)
    stress, _ = simulate(model, P, t, e, adjoint=False)
    below = (P["E"] * e[:, 0] < 0.98 * P["sy"]) & (e[:, 0] > 0)
    assert below.sum() >= 25
    torch.testing.assert_close(stress[below, 0] / e[below, 0],
                               torch.full((int(below.sum()),), P["E"]), rtol=1e-12, atol=0.0)
    # and beyond yield the tangent is far below E
    assert (stress[-1, 0] - stress[-2, 0]) / (e[-1, 0] - e[-2, 0]) < 0.5 * P["E"]


def test_perzyna_voce_saturates_at_sy_plus_Rinf_plus_overstress():
    model, P = get_model("perzyna-voce"), PARAMS["perzyna-voce"]
    rates = torch.tensor([1e-4, 1e-2])
    u = torch.linspace(0.0, 1.0, 201)[:, None]
    time, strain = u * (0.4 / rates), u * torch.full((2,), 0.4)
    stress, report = simulate(model, P, time, strain, adjoint=False)
    assert report.n_failed == 0
    expected = P["sy"] + P["Rinf"] + P["eta"] * rates ** (1.0 / P["n"])
    torch.testing.assert_close(stress[-1], expected, rtol=2e-5, atol=0.0)
    # steady: the last tenth of the path is flat to within the remaining Voce hardening
    assert (stress[-20:] - stress[-1]).abs().max() < 0.05


def test_voce_jc_flow_stress_follows_its_rate_law():
    """Steady plastic flow at rate r: sigma = (sy + R)(1 + C ln(1 + r / eps0)), R ~ Rinf."""
    model, P = get_model("voce-jc"), PARAMS["voce-jc"]
    rates = torch.tensor([1e-3, 1.0, 1e2])
    u = torch.linspace(0.0, 1.0, 201)[:, None]
    time, strain = u * (0.5 / rates), u * torch.full((3,), 0.5)
    stress, report = simulate(model, P, time, strain, adjoint=False)
    assert report.n_failed == 0
    expected = (P["sy"] + P["Rinf"]) * (1.0 + P["C"] * torch.log1p(rates / P["eps0"]))
    torch.testing.assert_close(stress[-1], expected, rtol=1e-3, atol=0.0)
    assert (torch.diff(stress[-1]) > 30.0).all()  # clearly rising with rate


def test_chaboche_bauschinger_effect():
    """On reversal the reverse yield magnitude is the forward flow stress less about 2X."""
    model = get_model("chaboche")
    P = dict(PARAMS["chaboche"], Rinf=50.0, eta=10.0)  # little overstress at 1e-3/s
    # load to 2% at 1e-3/s, then reverse at 1e-3/s
    t, e = piecewise_path([(20.0, 0.02), (3.0, 0.017)], 300)
    t = torch.cat([t[:300:3], t[300:]])  # 100 points forward, 300 (2 MPa apart) in reverse
    e = torch.cat([e[:300:3], e[300:]])
    options = SolverOptions()
    grid = refine(t, e, plan_substeps(model, P, t, e, options).substeps)
    states, _, report = solve_recorded(model, P, grid, options, adjoint=False)
    assert report.n_failed == 0
    rec = states[:, 0]
    k = int(torch.argmax(e[:, 0]))  # reversal
    s = rec[:, 0]
    sigma_f, X = s[k].item(), rec[k, 2].item()
    assert X > 50.0  # a real backstress
    # reverse yield: first point departing by 1 MPa from the elastic unloading line
    elastic = sigma_f - P["E"] * (e[k, 0] - e[k:, 0])
    off = torch.nonzero((elastic - s[k:]).abs() > 1.0)[0].item()
    sigma_r = s[k + off].item()
    assert sigma_r < 0.0 and abs(sigma_r) < sigma_f - X
    drop = sigma_f - abs(sigma_r)
    print(f"forward {sigma_f:.1f}, reverse yield {sigma_r:.1f}, drop {drop:.1f}, 2X {2 * X:.1f}")
    assert drop == pytest.approx(2.0 * X, rel=0.05)


# --------------------------------------------------------------------------------------------
# 6-8. accuracy against the independent reference


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # Radau's rejected trial steps
@pytest.mark.parametrize("name", list(PARAMS))
def test_matches_independent_radau_integration(name):
    """Default settings (radau-iia, steps planned from tolerance 0.05 MPa): the error at the
    recorded points against scipy's Radau stays within the tolerance, and within a tolerance
    eight times tighter, which cuts the rms error at least threefold."""
    model, P = get_model(name), PARAMS[name]
    t, e = informative_path(30)
    exact = radau_reference(name, P, t[:, 0].numpy(), e[:, 0].numpy())
    errors = []
    for tolerance in (0.05, 0.05 / 8):
        stress, report = simulate(model, P, t, e, SolverOptions(tolerance=tolerance),
                                  adjoint=False)
        assert report.n_failed == 0
        diff = stress[:, 0].numpy() - exact
        errors.append((rms(diff), float(np.abs(diff).max())))
    print(f"{name}: (rms, max) vs Radau at tolerance 0.05 and 0.05/8 MPa: {errors}")
    assert errors[0][0] < 0.02 and errors[0][1] < 0.05
    assert errors[1][1] < 0.05 / 8 and errors[1][0] < errors[0][0] / 3


def _hold_path_errors(scheme, counts=(160, 320, 640)):
    """rms errors on uniform grids of a load at 1e-3/s for 20 s, then a 20 s hold."""
    model, P = get_model("perzyna-voce"), PARAMS["perzyna-voce"]
    obs = np.linspace(0.0, 40.0, 41)

    def strain_of(time):
        return np.minimum(1e-3 * time, 0.02)

    exact = radau_reference("perzyna-voce", P, obs, strain_of(obs), tol=1e-12)
    errors = []
    for n in counts:
        time = torch.linspace(0.0, 40.0, n + 1)
        grid = Grid(time=time[:, None], strain=torch.as_tensor(strain_of(time.numpy()))[:, None],
                    recorded=torch.arange(0, n + 1, n // 40))
        options = SolverOptions(n_chunk=50, scheme=scheme, rtol=1e-13, atol=1e-10)
        states, report = integrate(model, P, grid, options, adjoint=False)
        assert report.n_failed == 0
        errors.append(rms(states[grid.recorded, 0, 0].numpy() - exact))
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    print(f"{scheme}: rms errors {errors}, observed orders {orders}")
    return orders


def test_first_order_convergence_on_a_uniform_grid():
    """Backward Euler is first order: the error halves when the step halves."""
    orders = _hold_path_errors("backward-euler")
    assert ((orders >= 0.8) & (orders <= 1.2)).all()


@pytest.mark.parametrize("scheme, lowest", [("sdirk2", 1.8), ("radau-iia", 1.8)])
def test_higher_order_convergence_on_a_uniform_grid(scheme, lowest):
    """The two-stage schemes converge at order two or better on the same path (the onset of
    yield, where the flow rule has a kink inside a step, keeps radau-iia below its
    classical order three)."""
    assert (_hold_path_errors(scheme) >= lowest).all()


# Three perzyna-voce parameter sets: moderate, stiff hardening (d=100, n=3), near-linear
# viscosity (n=2).
ACCURACY_SETS = {
    "moderate": PARAMS["perzyna-voce"],
    "stiff-hardening": dict(E=200000.0, sy=250.0, Rinf=300.0, d=100.0, eta=200.0, n=3.0),
    "low-n": dict(E=200000.0, sy=200.0, Rinf=150.0, d=30.0, eta=300.0, n=2.0),
}


@pytest.mark.parametrize("label", list(ACCURACY_SETS))
def test_default_substeps_integration_error_below_noise_budget(label):
    """rms(default solve - exact) at the recorded points of the informative path (30 points a
    segment) must stay below 0.3 x 2 MPa, while the recorded points alone are well above it."""
    model, P = get_model("perzyna-voce"), ACCURACY_SETS[label]
    t, e = informative_path(30)
    exact = radau_reference("perzyna-voce", P, t[:, 0].numpy(), e[:, 0].numpy())
    stress, report = simulate(model, P, t, e, SolverOptions(), adjoint=False)
    assert report.n_failed == 0
    error = rms(stress[:, 0].numpy() - exact)
    coarse, _ = simulate(model, P, t, e, SolverOptions(substeps=1, transient_substeps=1),
                         adjoint=False)
    coarse_error = rms(coarse[:, 0].numpy() - exact)
    print(f"{label}: rms error with default sub-steps {error:.3f} MPa "
          f"(recorded points only: {coarse_error:.3f} MPa)")
    assert coarse_error > 0.6  # the check discriminates
    assert error < 0.05


# --------------------------------------------------------------------------------------------
# 9. retries and failures

JC_STIFF = dict(E=200000.0, sy=300.0, Rinf=700.0, d=4.0, C=0.02, eps0=1e-3)
AGGRESSIVE = dict(n_chunk=100, first_chunk=0, predictor="zero", substeps=4)


@pytest.fixture
def no_iterate_bound(monkeypatch):
    """voce-jc without its bound on Newton iterates (``MaterialModel.bound_iterate``), so
    that its stiff chunks fail and the retry paths run."""
    from bayescal.material import MaterialModel, VoceJC

    monkeypatch.setattr(VoceJC, "bound_iterate", MaterialModel.bound_iterate)


def _high_rate_path():
    return piecewise_path([(0.2 / 1e3, 0.2)], 40)  # 1e3 /s to 20% strain


def test_retry_rescues_a_chunk_that_fails(no_iterate_bound):
    model = get_model("voce-jc")
    t, e = _high_rate_path()
    stress, report = simulate(model, JC_STIFF, t, e, SolverOptions(retry=False, **AGGRESSIVE),
                              adjoint=False)
    assert report.n_failed == 1 and report.failed_indices() == [0]
    assert torch.isnan(stress[1:, 0]).all()  # left as NaN from the failed chunk on, never zeros

    stress, report = simulate(model, JC_STIFF, t, e, SolverOptions(**AGGRESSIVE), adjoint=False)
    assert report.n_failed == 0 and report.retries > 0
    assert torch.isfinite(stress).all()
    sequential, seq_report = simulate(model, JC_STIFF, t, e, SolverOptions(n_chunk=1, substeps=4),
                                      adjoint=False)
    assert seq_report.n_failed == 0
    assert ((stress - sequential).abs().max() / sequential.abs().max()).item() <= 1e-6


def test_adjoint_after_retries_matches_sequential_solve(no_iterate_bound):
    model = get_model("voce-jc")
    t, e = _high_rate_path()
    grads = []
    for options in (SolverOptions(**AGGRESSIVE), SolverOptions(n_chunk=1, substeps=4)):
        p = {k: torch.tensor(v, requires_grad=k in ("sy", "Rinf", "C")) for k, v in JC_STIFF.items()}
        stress, report = simulate(model, p, t, e, options)
        assert report.n_failed == 0
        stress.sum().backward()
        grads.append(torch.stack([p[k].grad for k in ("sy", "Rinf", "C")]))
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=0.0)


def test_the_iterate_bound_converges_where_newton_crept_to_the_same_solution(monkeypatch):
    """voce-jc's bound on Newton iterates (|sigma| at most the flow stress times
    ``1 + C ln(1 + 100 max|strain rate| / eps0)``): a chunk that fails without it (Newton
    creeping down the exponential flow rule from a predictor beyond yield) converges with it,
    without a retry and in fewer residual evaluations, to the stress and adjoint gradient of
    a sequential solve; and on prior draws on the informative path stress and gradient are
    those of a solve without the bound."""
    from bayescal.material import MaterialModel, VoceJC

    calls = _count_evaluations(monkeypatch)
    model = get_model("voce-jc")
    names = ("sy", "Rinf", "C")

    def solve(t, e, params, options):
        p = {k: torch.as_tensor(v, dtype=torch.float64).clone().requires_grad_(k in names)
             for k, v in params.items()}
        calls[0] = 0
        stress, report = simulate(model, p, t, e, options)
        evaluations = calls[0]
        assert report.n_failed == 0
        (_weights(t.shape[0]) * stress).sum().backward()
        return (stress.detach(), torch.stack([p[k].grad for k in names]), report.retries,
                evaluations)

    t, e = _high_rate_path()
    bounded = solve(t, e, JC_STIFF, SolverOptions(**AGGRESSIVE))
    sequential = solve(t, e, JC_STIFF, SolverOptions(n_chunk=1, substeps=4))
    batch = 16
    tb, eb = informative_path(10, batch=batch)
    g = torch.Generator().manual_seed(3)
    draws = {k: v * (1.0 + 0.2 * (torch.rand(batch, generator=g, dtype=torch.float64) - 0.5))
             for k, v in JC_STIFF.items()}
    draws["C"] = torch.full((batch,), 0.02, dtype=torch.float64)
    options = SolverOptions(n_chunk=20, substeps=2, transient_substeps=8)
    draws_bounded = solve(tb, eb, draws, options)
    monkeypatch.setattr(VoceJC, "bound_iterate", MaterialModel.bound_iterate)
    unbounded = solve(t, e, JC_STIFF, SolverOptions(**AGGRESSIVE))
    draws_unbounded = solve(tb, eb, draws, options)

    assert unbounded[2] > 0 and bounded[2] == 0  # the chunk failed without the bound only
    assert bounded[3] < 0.5 * unbounded[3]
    assert ((bounded[0] - sequential[0]).abs().max() / sequential[0].abs().max()) <= 1e-9
    torch.testing.assert_close(bounded[1], sequential[1], rtol=1e-7, atol=0.0)
    torch.testing.assert_close(draws_bounded[0], draws_unbounded[0], rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(draws_bounded[1], draws_unbounded[1], rtol=1e-8, atol=0.0)


def test_a_few_failed_specimens_of_a_large_batch_are_re_solved_alone(monkeypatch,
                                                                      no_iterate_bound):
    """In a batch of 64 where 4 stiff specimens fail a chunk, only those 4 are re-solved
    (a sub-batch), and stress and adjoint gradient equal a sequential solve's."""
    from bayescal.material import StrainControlledResidual

    restricted = []
    restrict = StrainControlledResidual.restrict
    monkeypatch.setattr(StrainControlledResidual, "restrict",
                        lambda self, index: restricted.append(len(index)) or restrict(self, index))
    model = get_model("voce-jc")
    t, e = _high_rate_path()
    t, e = t.expand(-1, 64).contiguous(), e.expand(-1, 64).contiguous()  # (point, 1) paths
    grads = []
    for options in (SolverOptions(**AGGRESSIVE), SolverOptions(n_chunk=1, substeps=4)):
        p = {k: torch.full((64,), v) for k, v in JC_STIFF.items()}
        p["sy"][4:] = 1e5  # 60 specimens stay elastic: their Newton converges at once
        p = {k: v.requires_grad_(k in ("sy", "Rinf", "C")) for k, v in p.items()}
        stress, report = simulate(model, p, t, e, options)
        assert report.n_failed == 0
        (_weights(t.shape[0]) * stress).sum().backward()
        grads.append((stress.detach(), torch.stack([p[k].grad for k in ("sy", "Rinf", "C")])))
    assert restricted and max(restricted) == 4  # the 4 stiff specimens alone
    (stress, grad), (sequential, seq_grad) = grads
    assert ((stress - sequential).abs().max() / sequential.abs().max()).item() <= 1e-6
    torch.testing.assert_close(grad[:, :4], seq_grad[:, :4], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad[:, 4:], seq_grad[:, 4:], rtol=1e-6, atol=1e-12)


def _never_converging():
    """Specimens 0 and 2 stay elastic (one Newton iteration solves a linear step), specimen 1
    yields and cannot converge in one iteration."""
    model = get_model("perzyna-voce")
    t, e = informative_path(10, batch=3)
    P = PARAMS["perzyna-voce"]
    p = {k: torch.full((3,), v) for k, v in P.items()}
    p["sy"][0] = p["sy"][2] = 1e5
    p = {k: v.requires_grad_() for k, v in p.items()}
    stress, report = simulate(model, p, t, e, SolverOptions(max_iterations=1))
    return p, stress, report


def test_unconvergeable_specimen_is_reported_and_nan():
    p, stress, report = _never_converging()
    assert report.failed_indices() == [1] and report.n_failed == 1
    assert torch.isfinite(stress[:, [0, 2]]).all()
    assert torch.isnan(stress[-1, 1])
    stress.sum().backward()
    # the healthy specimens' gradients are finite (and E's is not trivially zero)
    for k, v in p.items():
        assert torch.isfinite(v.grad[[0, 2]]).all(), k
    assert (p["E"].grad[[0, 2]] > 0).all()
    assert torch.isnan(p["E"].grad[1])


def test_failed_specimen_gradients_are_nan_not_zero():
    p, stress, report = _never_converging()
    stress.sum().backward()
    for k in CALIBRATED["perzyna-voce"]:
        assert torch.isnan(p[k].grad[1]), f"d loss / d {k} of the failed specimen is {p[k].grad[1]}"


# --------------------------------------------------------------------------------------------
# 10. the cheaper gradient's pieces (issue 12): the block solve, and giving up on a hopeless
# Newton iteration


@pytest.mark.parametrize("steps, batch, n", [(1, 3, 2), (7, 5, 4), (20, 12, 6)])
def test_small_block_scan_matches_pyzag_thomas_solve(steps, batch, n):
    """Forward substitution with pyzag's LU factors and one ``baddbmm`` a step solves the
    block bidiagonal system as pyzag's generic Thomas solve does."""
    from pyzag.chunktime import BidiagonalThomasFactorization
    from pyzag.operators.dense import DenseBlockOperator, DenseBlockVector

    from bayescal.integrate import SmallBlockScan

    gen = torch.Generator().manual_seed(12)
    A = torch.randn(steps, batch, n, n, generator=gen) + 4 * torch.eye(n)
    B = torch.randn(steps - 1, batch, n, n, generator=gen)
    v = DenseBlockVector(torch.randn(steps, batch, n, generator=gen))
    expected = BidiagonalThomasFactorization(DenseBlockOperator.factored(A),
                                             DenseBlockOperator(B)).matvec(v).data
    for a in (DenseBlockOperator.factored(A), DenseBlockOperator(A)):  # pyzag's LU, or its own
        x = SmallBlockScan(a, DenseBlockOperator(B)).matvec(v).data
        torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)


def _jc_informative(n_chunk):
    """voce-jc at the shipped card's prior centre on the informative path (10 points a
    segment, 4 sub-steps), where long chunks of its exponential flow rule fail in Newton."""
    model = get_model("voce-jc")
    t, e = informative_path(10)
    P = dict(E=200000.0, sy=300.0, Rinf=300.0, d=10.0, C=0.02, eps0=1e-3)
    p = {k: torch.tensor(v, requires_grad=k in ("sy", "Rinf", "C")) for k, v in P.items()}
    options = SolverOptions(n_chunk=n_chunk, substeps=4, transient_substeps=16)
    return model, p, t, e, options


def _count_evaluations(monkeypatch):
    from bayescal.material import StrainControlledResidual

    calls = [0]
    evaluate = StrainControlledResidual.evaluate_raw

    def counting(self, *args):
        calls[0] += 1
        return evaluate(self, *args)

    monkeypatch.setattr(StrainControlledResidual, "evaluate_raw", counting)
    return calls


def test_giving_up_a_hopeless_chunk_saves_newton_iterations_not_accuracy(monkeypatch,
                                                                         no_iterate_bound):
    """On a path where voce-jc's chunks fail, giving up early re-solves them in halves after
    a few iterations instead of ``max_iterations``: fewer residual evaluations, the same
    gradient (against a sequential solve) and the same stress."""
    from bayescal.integrate import _ChunkNewton

    calls = _count_evaluations(monkeypatch)
    results = {}
    for label, first in (("give up", _ChunkNewton.MIN_ITERATIONS), ("never", 10**9),
                         ("sequential", None)):
        monkeypatch.setattr(_ChunkNewton, "MIN_ITERATIONS", first or 10**9)
        model, p, t, e, options = _jc_informative(1 if first is None else 20)
        calls[0] = 0
        stress, report = simulate(model, p, t, e, options)
        assert report.n_failed == 0
        forward = calls[0]
        (_weights(t.shape[0]) * stress).sum().backward()
        results[label] = (stress.detach(), torch.stack([p[k].grad for k in ("sy", "Rinf", "C")]),
                          forward, report.retries)
    stress, grad, forward, retries = results["give up"]
    assert results["never"][3] > 0  # the problem has chunks that fail
    assert forward < 0.75 * results["never"][2]
    for other in ("never", "sequential"):
        torch.testing.assert_close(stress, results[other][0], rtol=1e-9, atol=1e-8)
        torch.testing.assert_close(grad, results[other][1], rtol=1e-8, atol=0.0)


def test_a_warm_start_moves_the_trajectory_to_the_solution_before_each_chunk():
    """The warm start's predictor: the chunk's part of the given trajectory plus the offset
    of this solve's last state from it; the first chunk takes the trajectory as it is."""
    from bayescal.integrate import ShiftedTrajectoryPredictor

    history = torch.arange(24.0).reshape(6, 2, 2)
    results = history.clone()
    results[2] += torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    predictor = ShiftedTrajectoryPredictor(history)
    torch.testing.assert_close(predictor.predict(results, 3, 2),
                               history[3:5] + results[2] - history[2], rtol=0, atol=0)
    torch.testing.assert_close(predictor.predict(results, 0, 2), history[:2], rtol=0, atol=0)


def test_a_shifted_warm_start_saves_newton_iterations_not_accuracy(monkeypatch):
    """Started from the trajectory of parameters 3 % away (a line-search point's case), the
    moved trajectory needs fewer residual evaluations than the trajectory as it stands, and
    both give the stress of a solve from the predictor."""
    import bayescal.integrate as integration
    from pyzag.nonlinear import FullTrajectoryPredictor

    model, P = get_model("perzyna-voce"), PARAMS["perzyna-voce"]
    t, e = informative_path(10, batch=4)
    options = SolverOptions(rtol=1e-11, atol=1e-9, n_chunk=20, substeps=2,
                            transient_substeps=8)
    grid = refine(t, e, fixed_substeps(t, e, options))
    scale = torch.tensor([1.0, 1.01, 0.98, 1.03])
    near = {k: torch.full((4,), v) for k, v in P.items()}
    moved = {**near, "sy": near["sy"] * scale, "Rinf": near["Rinf"] / scale}
    trajectory, _ = integrate(model, near, grid, options, adjoint=False)
    cold, _ = integrate(model, moved, grid, options, adjoint=False)
    calls = _count_evaluations(monkeypatch)
    states, evaluations = {}, {}
    for label, predictor in (("moved", integration.ShiftedTrajectoryPredictor),
                             ("as it stands", FullTrajectoryPredictor)):
        monkeypatch.setattr(integration, "ShiftedTrajectoryPredictor", predictor)
        calls[0] = 0
        states[label], report = integrate(model, moved, grid, options, adjoint=False,
                                          guess=trajectory)
        evaluations[label] = calls[0]
        assert report.n_failed == 0
        torch.testing.assert_close(states[label][..., 0], cold[..., 0], rtol=1e-9, atol=1e-7)
    assert evaluations["moved"] < 0.5 * evaluations["as it stands"]  # 30 against 109
