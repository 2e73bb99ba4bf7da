"""Steps that span several recorded intervals where the load is straight, and the stress at
the recorded points inside them from the scheme's collocation polynomial."""

import dataclasses

import numpy as np
import pytest
import torch

from bayescal.check import informative_path
from bayescal.integrate import (SolverOptions, initial_substeps, linear_joins, plan_substeps,
                                rate_changes, refine, simulate, spans, stage_weights)
from bayescal.material import get_model
from bayescal.reference import radau_stress
from bayescal.schemes import SCHEMES

P = dict(E=200000.0, sy=200.0, Rinf=150.0, d=30.0, eta=100.0, n=5.0)
CALIBRATED = ("sy", "Rinf", "d", "eta", "n")


def path(batch=1, points=10):
    t, e = informative_path(points)
    return (t[:, None].expand(-1, batch).contiguous(), e[:, None].expand(-1, batch).contiguous())


def test_linear_joins_are_the_straight_runs_of_every_path():
    t, e = path(2)
    joins = linear_joins(t, e)
    # five segments of 10 intervals: each segment's first interval starts a new line
    expected = torch.ones(50, dtype=torch.bool)
    expected[::10] = False
    assert torch.equal(joins, expected)
    noisy = e.clone()
    noisy[5, 1] += 1e-9  # one path's measured strain off the line by 1e-9
    assert not linear_joins(t, noisy)[5:7].any() and linear_joins(t, noisy)[7:10].all()
    padded_t = torch.cat([t, t[-1:].expand(3, -1)])  # a shorter path padded: no time passes
    padded_e = torch.cat([e, e[-1:].expand(3, -1)])
    assert not linear_joins(padded_t, padded_e)[50:].any()
    temperature = 293.0 + 0.0 * t
    temperature[20:] += torch.arange(31, dtype=t.dtype)[:, None]  # heating from point 20 on
    joins_t = linear_joins(t, e, temperature)
    assert not joins_t[20] and joins_t[21:30].all() and torch.equal(joins_t[:20], joins[:20])


def test_initial_steps_group_each_run_in_powers_of_two():
    t, e = path()
    first = initial_substeps(rate_changes(t, e), linear_joins(t, e), max_span=8)
    # each segment: 4 steps in its first interval (the rate changes), then 9 straight
    # intervals: one step over 8 of them, one over the last
    segment = [4.0] + [1 / 8] * 8 + [1.0]
    assert first.tolist() == segment * 5
    assert initial_substeps(rate_changes(t, e), linear_joins(t, e), 1).tolist() == \
        ([4.0] + [1.0] * 9) * 5
    assert [s[1] for s in spans(first)] == [1, 8, 1] * 5


def test_refine_puts_recorded_points_inside_spanning_steps():
    t = torch.tensor([0.0, 1.0, 3.0, 4.0, 6.0, 7.0, 9.0])[:, None]  # uneven times
    e = 1e-3 * t
    with pytest.raises(ValueError, match=r"intervals 3..6 are not 4 intervals of 1/4 step"):
        refine(t, e, torch.tensor([0.5, 0.5, 2.0, 0.25, 0.25, 0.25]))
    substeps = torch.tensor([0.5, 0.5, 2.0, 0.5, 0.5, 1.0])
    grid = refine(t, e, substeps)
    assert grid.time[:, 0].tolist() == [0.0, 3.0, 3.5, 4.0, 7.0, 9.0]
    assert grid.recorded.tolist() == [0, 1, 1, 3, 4, 4, 5]
    assert grid.theta[:, 0].tolist() == [1.0, 1 / 3, 1.0, 1.0, 2 / 3, 1.0, 1.0]
    with pytest.raises(ValueError, match="interval 0 has 1.5 steps"):
        refine(t, e, torch.tensor([1.5, 1.0, 1.0, 1.0, 1.0, 1.0]))
    assert refine(t, e, torch.ones(6)).theta is None  # every recorded point ends a step


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_stage_weights_reproduce_polynomials_through_the_stages(scheme):
    c = SCHEMES[scheme].c
    theta = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    w = stage_weights(theta, c)
    nodes = torch.tensor((0.0, *c), dtype=torch.float64)
    for degree in range(len(c) + 1):  # exact up to the number of stages
        assert torch.allclose(w @ nodes**degree, theta**degree, atol=1e-14)
    assert w[-1].tolist() == [0.0] * len(c) + [1.0]  # exactly the end of the step


def test_gradient_through_interpolated_points_matches_finite_differences():
    model = get_model("perzyna-voce")
    t, e = path(1, points=30)
    options = SolverOptions(tolerance=0.5, rtol=1e-12, atol=1e-11)
    substeps = plan_substeps(model, P, t, e, options).substeps
    assert (substeps < 1).any()  # some steps span several intervals
    w = torch.linspace(0.5, 1.5, t.shape[0], dtype=torch.float64)[:, None]
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in CALIBRATED)
         for k, v in P.items()}
    stress, report = simulate(model, p, t, e, options, substeps=substeps)
    (w * stress).sum().backward()
    adjoint = torch.stack([p[k].grad for k in CALIBRATED])
    batch = 2 * len(CALIBRATED)
    pb = {k: torch.full((batch,), v, dtype=torch.float64) for k, v in P.items()}
    h = torch.tensor([1e-5 * P[k] for k in CALIBRATED], dtype=torch.float64)
    for i, k in enumerate(CALIBRATED):
        pb[k][2 * i] += h[i]
        pb[k][2 * i + 1] -= h[i]
    stress, report = simulate(model, pb, t.expand(-1, batch), e.expand(-1, batch), options,
                              adjoint=False, substeps=substeps)
    loss = (w * stress).sum(0)
    central = (loss[0::2] - loss[1::2]) / (2 * h)
    rel = float(((central - adjoint).abs() / adjoint.abs()).max())
    print(f"adjoint vs central differences through interpolated points: {rel:.2e}")
    assert rel < 1e-7


def test_planned_spans_keep_the_tolerance_and_take_fewer_steps():
    """The planner starts from spans of up to ``max_span`` intervals and splits those where
    the error grows: within the tolerance against scipy's Radau, at step ends and at the
    points inside steps alike (a span over the kink at yield would miss it by tens of MPa),
    in fewer steps than without spans."""
    model = get_model("perzyna-voce")
    t, e = path(1, points=30)
    exact = radau_stress("perzyna-voce", P, t[:, 0].numpy(), e[:, 0].numpy(), 1e-11)
    steps, worst = {}, {}
    for span in (1, 8):
        options = SolverOptions(tolerance=0.2, max_span=span)
        plan = plan_substeps(model, P, t, e, options)
        assert ((plan.substeps < 1).any()) == (span > 1)
        stress, report = simulate(model, P, t, e, options, adjoint=False,
                                  substeps=plan.substeps)
        steps[span] = int(plan.substeps.sum())
        error = np.abs(stress[:, 0].numpy() - exact)
        worst[span] = float(error.max())
        if span > 1:  # the points inside spanning steps, read off the collocation polynomial
            inside = (refine(t, e, plan.substeps).theta[:, 0] < 1).numpy()
            assert inside.sum() >= 10
            worst["inside"] = float(error[inside].max())
    print(f"steps {steps}, largest error {worst} MPa")
    assert worst[8] <= 0.2 and worst[1] <= 0.2 and worst["inside"] <= 0.2
    assert steps[8] < 0.8 * steps[1]


def test_a_plan_without_spans_is_the_previous_plan():
    """``max_span = 1`` plans whole steps per interval, as before steps could span several."""
    model = get_model("perzyna-voce")
    t, e = path(3, points=10)
    plan = plan_substeps(model, P, t, e, dataclasses.replace(SolverOptions(), max_span=1))
    assert (plan.substeps >= 1).all() and (plan.substeps == plan.substeps.round()).all()


def test_a_first_order_scheme_never_spans():
    """Backward Euler (order 1) plans whole steps per interval whatever ``max_span`` says:
    its step-doubling estimate missed the error of the points interpolated inside a step;
    the same path at radau-iia does span."""
    model = get_model("perzyna-voce")
    t, e = path(1, points=10)
    plans = {scheme: plan_substeps(model, P, t, e, SolverOptions(scheme=scheme, tolerance=0.5))
             for scheme in ("backward-euler", "radau-iia")}
    euler = plans["backward-euler"].substeps
    assert (euler >= 1).all() and (euler == euler.round()).all()
    assert (plans["radau-iia"].substeps < 1).any()
