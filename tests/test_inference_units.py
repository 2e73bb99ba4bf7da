"""Unit tests of the inference layer's derived formulas: each against what it must preserve
or a direct computation, not end to end."""

from __future__ import annotations

import math

import pytest
import torch

from bayescal.card import load_card
from bayescal.hierarchy import Hierarchy
from bayescal.inference.guides import make_guide
from bayescal.inference.packing import (Packing, congruence, from_centered, initial_values,
                                        latent_names, to_centered, to_centered_jacobian)
from bayescal.inference.svi import plateaued
from bayescal.testing import CARD, synthetic


@pytest.fixture(scope="module")
def problem():
    experiments, _ = synthetic(4, seed=2, points_per_segment=4)
    return experiments


def packing_for(experiments, centered=False) -> Packing:
    h = Hierarchy(load_card(CARD), experiments, centered=centered)
    return Packing(h, initial_values(h))


def random_points(packing: Packing, n: int, seed: int, scale: float = 0.5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return packing.u0 + scale * torch.randn(n, packing.dim, generator=generator,
                                            dtype=torch.float64)


def test_packing_round_trips_its_starting_values(problem):
    packing = packing_for(problem)
    point = packing.point(packing.u0)
    start = initial_values(packing.h)
    assert set(point) == set(latent_names(packing.h))
    for name, value in start.items():
        torch.testing.assert_close(point[name], value.reshape(point[name].shape), rtol=1e-12,
                                   atol=1e-12)
    # the layout is the order in which the model samples: globals before the specimen plate
    names = [site.name for site in packing.sites]
    assert names.index("noise_sd") == len(names) - 1
    assert max(names.index(f"{p}_cv") for p in packing.h.spec.varying) < \
        min(names.index(f"{p}_offset") for p in packing.h.spec.varying)


def test_recentre_keeps_what_the_likelihood_sees(problem):
    packing = packing_for(problem)
    u = random_points(packing, 5, seed=0)
    moved = packing.recentre(u)
    torch.testing.assert_close(packing.likelihood_coordinates(moved),
                               packing.likelihood_coordinates(u), rtol=0, atol=1e-12)
    where = packing.slices()
    for name in packing.h.spec.varying:
        z = packing.likelihood_coordinates(moved)  # population at the specimens' mean in z
        pop = moved[:, where[f"{name}_pop_z"]].squeeze(-1)
        offsets = moved[:, where[f"{name}_offset"]]
        assert float(offsets.mean(-1).abs().max()) < 1e-12, name
        assert torch.isfinite(pop).all() and torch.isfinite(z).all()
    assert not torch.allclose(moved, u)


def conditional_log_density(cv, s2, k, spread, m):
    """log HalfNormal(cv; spread) - m log(k cv) - S2 / (2 (k cv)^2), up to a constant."""
    tau = k * cv
    return -0.5 * (cv / spread) ** 2 - m * math.log(tau) - s2 / (2 * tau**2)


@pytest.mark.parametrize("joint", [False, True])
def test_spread_at_specimens_is_the_conditional_mode(problem, joint):
    """Each cv moves to the maximum of its conditional density (closed form checked against
    a fine grid search), keeping every specimen's value: with the location integrated out
    (``m = n - 1``), or in the non-centered joint density (``joint``: ``m = -1``, the
    ``cv`` of the log transform's Jacobian and no volume factor)."""
    packing = packing_for(problem)
    h, where = packing.h, packing.slices()
    u = random_points(packing, 3, seed=1)
    moved = packing.spread_at_specimens(u, joint=joint)
    torch.testing.assert_close(packing.likelihood_coordinates(moved),
                               packing.likelihood_coordinates(u), rtol=0, atol=1e-10)
    m = -1 if joint else h.experiments.n_specimens - 1
    for name in h.spec.varying:
        spread = h.spec.parameters[name].spread
        for row in range(u.shape[0]):
            pop = moved[row, where[f"{name}_pop_z"]]
            k = float(h.specimen_scale(name, pop, torch.ones_like(pop)))
            cv = float(moved[row, where[f"{name}_cv"]].exp())
            z_dev = k * cv * moved[row, where[f"{name}_offset"]]
            s2 = float((z_dev**2).sum())
            grid = torch.linspace(1e-4, 5 * spread, 200001, dtype=torch.float64)
            values = (-0.5 * (grid / spread) ** 2 - m * torch.log(k * grid)
                      - s2 / (2 * (k * grid) ** 2))
            best = float(grid[values.argmax()])
            assert abs(cv - best) <= 2 * float(grid[1] - grid[0]), (name, cv, best)
            assert conditional_log_density(cv, s2, k, spread, m) >= float(values.max()) - 1e-9


def test_to_centered_changes_the_density_by_the_jacobian(problem):
    """The centered density at ``to_centered(u)`` is the non-centered one at ``u`` less
    ``sum log tau`` (the Jacobian of offsets -> values): the same posterior."""
    non_centered = packing_for(problem)
    centered = packing_for(problem, centered=True)
    u = random_points(non_centered, 3, seed=2, scale=0.3)
    v = to_centered(non_centered, u)
    h, where = non_centered.h, non_centered.slices()
    log_tau = torch.zeros(u.shape[0], dtype=torch.float64)
    for name in h.spec.varying:
        pop = u[:, where[f"{name}_pop_z"]]
        tau = h.specimen_scale(name, pop, u[:, where[f"{name}_cv"]].exp())
        log_tau = log_tau + h.experiments.n_specimens * tau.log().squeeze(-1)
    with torch.no_grad():
        torch.testing.assert_close(centered.log_joint(v), non_centered.log_joint(u) - log_tau,
                                   rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("names", [None, ("sy",)])
def test_to_centered_jacobian_is_autograds_column_by_column(problem, names):
    """The Jacobian from one batch of directional derivatives (offsets of a kind moved
    together) is the one autograd builds a row at a time, with every varying parameter or
    one of them centered."""
    packing = packing_for(problem)
    names = packing.h.spec.varying if names is None else names
    for u in random_points(packing, 2, seed=5, scale=0.4):
        expected = torch.autograd.functional.jacobian(
            lambda v: to_centered(packing, v[None], names)[0], u)
        assert expected.count_nonzero() > packing.dim  # more than the identity
        torch.testing.assert_close(to_centered_jacobian(packing, u, names), expected,
                                   rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("full", [5, 40])
def test_congruence_is_the_dense_product(problem, full):
    """``congruence(J, M)`` is ``J.T @ M @ J``: for a Jacobian diagonal but for ``full``
    columns (the structured products: 5 of 60; 40 of 60 takes the dense ones), and for the
    centring map's own Jacobian."""
    generator = torch.Generator().manual_seed(7)
    dim = 60
    jacobian = torch.diag(0.5 + torch.rand(dim, generator=generator, dtype=torch.float64))
    columns = torch.randperm(dim, generator=generator)[:full]
    jacobian[:, columns] = torch.randn(dim, full, generator=generator, dtype=torch.float64)
    matrix = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    matrix = matrix + matrix.T
    expected = jacobian.T @ matrix @ jacobian
    torch.testing.assert_close(congruence(jacobian, matrix), expected, rtol=0,
                               atol=1e-13 * float(expected.abs().max()))
    packing = packing_for(problem)
    centring = to_centered_jacobian(packing, random_points(packing, 1, seed=8)[0])
    matrix = matrix[:packing.dim, :packing.dim]
    expected = centring.T @ matrix @ centring
    torch.testing.assert_close(congruence(centring, matrix), expected, rtol=0,
                               atol=1e-13 * float(expected.abs().max()))


def test_log_joint_is_prior_plus_likelihood_and_from_centered_inverts(problem):
    """``log_prior`` (no solve) and ``log_likelihood`` add up to ``log_joint`` exactly;
    ``from_centered`` undoes ``to_centered`` (what the Hessian's change of coordinates
    relies on)."""
    packing = packing_for(problem)
    u = random_points(packing, 3, seed=4, scale=0.3)
    with torch.no_grad():
        prior, likelihood = packing.log_prior(u), packing.log_likelihood(u)
        assert torch.equal(prior + likelihood, packing.log_joint(u))
    assert float(likelihood.abs().min()) > 100  # the data's term, not a zero
    torch.testing.assert_close(from_centered(packing, to_centered(packing, u)), u,
                               rtol=1e-12, atol=1e-12)


class _Quadratic:
    """A packing-like stand-in for the line search: log likelihood ``-(u - 1)^2`` summed,
    flat prior, counting the points solved."""

    class h:
        non_centered = ()

    def __init__(self):
        self.points = 0

    def log_likelihood(self, u, solving=None):
        self.points += u.shape[0]
        return -((u - 1.0) ** 2).sum(-1)

    def log_prior(self, u):
        return torch.zeros(u.shape[0], dtype=u.dtype)


def test_line_search_tries_the_full_step_first_then_shorter_ones_one_at_a_time():
    from bayescal.inference.laplace import LINE_SEARCH, _line_search

    u = torch.zeros(3, dtype=torch.float64)
    packing = _Quadratic()  # Newton's step from 0 is +1 in every coordinate: the full step
    point, gain, _ = _line_search(packing, u, torch.ones(3, dtype=torch.float64), -3.0)
    assert packing.points == 1 and gain == 3.0
    torch.testing.assert_close(point, torch.ones(3, dtype=torch.float64))
    packing = _Quadratic()  # a step twice too long: the full step gains nothing; half does
    point, gain, _ = _line_search(packing, u, 2 * torch.ones(3, dtype=torch.float64), -3.0)
    assert packing.points == 2 and gain == 3.0
    torch.testing.assert_close(point, torch.ones(3, dtype=torch.float64))
    packing = _Quadratic()  # from 0.5, four times too long: 1 and 0.5 gain nothing, 0.25 does
    half = torch.full((3,), 0.5, dtype=torch.float64)
    point, gain, _ = _line_search(packing, half, 2 * torch.ones(3, dtype=torch.float64), -0.75)
    assert packing.points == 3 and gain == 0.75
    torch.testing.assert_close(point, torch.ones(3, dtype=torch.float64))
    packing = _Quadratic()  # a step the wrong way: nothing gains, every length solved once
    assert _line_search(packing, u, -torch.ones(3, dtype=torch.float64), -3.0) == (None, 0.0,
                                                                                   None)
    assert packing.points == len(LINE_SEARCH)


def test_trust_step_damps_the_flat_directions_most():
    """Within the trust region the step is Newton's; beyond it ``(H + lam I)^-1 g`` with
    ``lam`` such that the longest coordinate is the limit: curvatures 1 and 100 and gradient
    (10, 100) give Newton's (10, 1); damped to 2, ``lam = 4``: (2, 100/104), where scaling
    Newton's step down gave (2, 0.2)."""
    from bayescal.inference.laplace import trust_step

    rotation = torch.linalg.qr(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))[0]
    eigval = torch.tensor([1.0, 100.0], dtype=torch.float64)
    grad = rotation @ torch.tensor([10.0, 100.0], dtype=torch.float64)
    newton = rotation @ torch.tensor([10.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(trust_step(eigval, rotation, grad, 20.0), newton,
                               rtol=1e-14, atol=0)
    # in the eigenvectors' own coordinates the limit applies to these components
    identity = torch.eye(2, dtype=torch.float64)
    step = trust_step(eigval, identity, torch.tensor([10.0, 100.0], dtype=torch.float64), 2.0)
    torch.testing.assert_close(step, torch.tensor([2.0, 100.0 / 104.0], dtype=torch.float64),
                               rtol=1e-12, atol=0)
    assert float(step.abs().max()) <= 2.0


def test_the_line_search_values_the_moved_populations_without_a_solve(problem, monkeypatch):
    """Each length is solved once; its point with the populations at their conditional
    mode (same specimen values) is valued by its prior alone, and that value is the log
    joint there."""
    from bayescal.inference.laplace import _line_search

    packing = packing_for(problem)
    u = random_points(packing, 1, seed=5, scale=0.3)[0]
    with torch.no_grad():
        value = float(packing.log_joint(u[None])[0])
    delta = torch.full_like(u, 1e-9)  # the step itself gains nothing; the move does
    solved = []
    log_likelihood = Packing.log_likelihood
    monkeypatch.setattr(Packing, "log_likelihood", lambda self, rows, solving=None: (
        solved.append(rows.shape[0]), log_likelihood(self, rows, solving))[1])
    point, gain, _ = _line_search(packing, u, delta, value)
    assert solved[0] == 1  # the full step alone, once
    moved = packing.spread_at_specimens(u[None] + delta, joint=True)[0]
    torch.testing.assert_close(point, moved, rtol=0, atol=0)
    with torch.no_grad():
        assert gain > 1.0
        torch.testing.assert_close(float(packing.log_joint(point[None])[0]), value + gain,
                                   rtol=1e-12, atol=1e-8)


def test_the_hessian_solves_only_where_the_likelihood_curves(problem, monkeypatch):
    """One solved batch of ``1 + 2 (shared + kinds)`` points per Hessian (half with forward
    differences): the noise's column and the population locations and spreads cost no
    solve."""
    from bayescal.inference.laplace import gradient_and_hessian

    packing = packing_for(problem)
    sizes = []
    solve = Hierarchy.solve_stress

    def counting(self, values, *args, **kwargs):
        sizes.append(next(iter(values.values())).shape[0])
        return solve(self, values, *args, **kwargs)

    monkeypatch.setattr(Hierarchy, "solve_stress", counting)
    u = random_points(packing, 1, seed=5, scale=0.3)[0]
    _, grad, central = gradient_and_hessian(packing, u, 1e-4)
    _, same_grad, forward = gradient_and_hessian(packing, u, 1e-4, central=False)
    spec = packing.h.spec
    directions = len(spec.shared) + len(spec.varying)
    assert sizes == [1 + 2 * directions, 1 + directions]
    torch.testing.assert_close(same_grad, grad, rtol=1e-12, atol=1e-12)
    # forward differences: error of order the step, enough to steer Newton
    assert float((forward - central).abs().max() / central.abs().max()) < 1e-3


def test_the_noise_column_refuses_a_noise_not_exp_of_its_coordinate():
    """The exact noise column holds for ``sigma = exp(u)`` only: another support fails loudly
    rather than giving a wrong Hessian."""
    from torch.distributions import constraints

    from bayescal.inference.laplace import noise_column
    from bayescal.inference.packing import Site

    class Bounded:
        sites = (Site("noise_sd", 0, torch.Size([]), constraints.interval(0.0, 50.0)),)

    with pytest.raises(NotImplementedError, match=r"^the noise's exact Hessian column needs "
                       r"sigma = exp\(u\); the noise prior's support Interval"):
        noise_column(Bounded(), torch.ones(3, dtype=torch.float64))


def test_the_hessian_started_from_the_iterates_trajectory_agrees_in_fewer_iterations(
        problem, monkeypatch):
    """The Hessian's points started from the iterate's own trajectory (:func:`start_near`)
    give the gradient and Hessian of a cold start, to the solver's tolerance, in fewer
    Newton iterations (counted as residual evaluations). The Hessian is a difference of
    gradients 1e-4 apart: a solve that stops at ``atol`` (1e-8) gives it an error of about
    1e-8 / 1e-4 of its scale, and a start as close as the trajectory's own (every stage
    value) stops there, where a cold start's last Newton step goes far below (1.4e-5 of the
    largest entry apart; a forward difference's own error is of order 1e-4)."""
    from bayescal.inference.laplace import (gradient_and_hessian, hessian_points, start_near,
                                            trajectory_of)
    from bayescal.material import StrainControlledResidual

    packing = packing_for(problem)
    u = random_points(packing, 1, seed=6, scale=0.3)[0]
    at_u = start_near(None, 1)
    with torch.no_grad():
        packing.log_likelihood(u[None], at_u)
    trajectory = trajectory_of(at_u, 0, 1)
    assert trajectory.shape[1] == problem.n_specimens
    evaluations = []
    evaluate = StrainControlledResidual.evaluate_raw
    monkeypatch.setattr(StrainControlledResidual, "evaluate_raw", lambda self, *args: (
        evaluations.append(1), evaluate(self, *args))[1])
    points = hessian_points(packing, central=False)
    results = {}
    for name, start in (("cold", None), ("warm", trajectory)):
        evaluations.clear()
        solving = start_near(start, points)
        results[name] = gradient_and_hessian(packing, u, 1e-4, solving, central=False)
        results[name] += (len(evaluations), trajectory_of(solving, 0, points))
    (cold_value, cold_grad, cold_hessian, cold_n, _), (value, grad, hessian, n, row) = (
        results["cold"], results["warm"])
    assert n < 0.9 * cold_n
    assert value == pytest.approx(cold_value, rel=1e-9)
    torch.testing.assert_close(grad, cold_grad, rtol=1e-8, atol=1e-8 * cold_grad.abs().max())
    torch.testing.assert_close(hessian, cold_hessian, rtol=1e-6,
                               atol=5e-5 * cold_hessian.abs().max())
    assert row.shape == trajectory.shape  # the iterate's own share of the batch


def test_plateaued_compares_the_last_two_windows_with_their_noise():
    falling = [100.0 - i for i in range(40)]
    flat = [float((-1) ** i) for i in range(40)]
    assert not plateaued(falling[:19], window=10)  # fewer than two windows: never
    assert not plateaued(falling, window=10)
    assert plateaued(flat, window=10)
    # a gain smaller than the noise of the means counts as a plateau
    noisy = [5.0 * (-1) ** i - 0.01 * i for i in range(40)]
    assert plateaued(noisy, window=10)


@pytest.mark.parametrize("kind", ["mvn", "lowrank"])
def test_whitened_guides_start_at_the_laplace_approximation(problem, kind):
    packing = packing_for(problem)
    generator = torch.Generator().manual_seed(3)
    root = torch.randn(packing.dim, packing.dim, generator=generator, dtype=torch.float64)
    covariance = 0.01 * root @ root.T + 0.05 * torch.eye(packing.dim, dtype=torch.float64)
    u_map = random_points(packing, 1, seed=4)[0]
    guide = make_guide(packing.h, kind, packing, u_map, covariance)
    posterior = guide.get_posterior()
    if kind == "mvn":  # exactly N(u_map, covariance)
        torch.testing.assert_close(posterior.mean.detach(), u_map, rtol=0, atol=1e-12)
        torch.testing.assert_close(posterior.covariance_matrix.detach(), covariance, rtol=1e-12,
                                   atol=1e-14)
        return
    # lowrank starts with its factor at 1 % of a unit scale: about N(u_map, covariance), to
    # the sampling error of 20000 draws
    torch.manual_seed(0)
    with torch.no_grad():
        draws = posterior.sample((20000,))
    assert float((draws.mean(0) - u_map).abs().max()) < 0.01
    error = float((torch.cov(draws.T) - covariance).norm() / covariance.norm())
    assert error < 0.05, error


@pytest.mark.parametrize("names", [("sy",), ("sy", "Rinf", "d", "eta")])
def test_mixed_centering_changes_the_density_by_its_jacobian(problem, names):
    """Some parameters centered, the others not: the density at ``to_centered(u, names)``
    differs from the non-centered one by the Jacobian of those parameters' offsets only."""
    non_centered = packing_for(problem)
    mixed = packing_for(problem, centered=names)
    assert [s.name for s in mixed.sites] == [
        s.name.replace("_offset", "_z") if s.name.removesuffix("_offset") in names else s.name
        for s in non_centered.sites]
    u = random_points(non_centered, 2, seed=5, scale=0.3)
    h, where = non_centered.h, non_centered.slices()
    log_tau = sum(h.experiments.n_specimens * h.specimen_scale(
        name, u[:, where[f"{name}_pop_z"]], u[:, where[f"{name}_cv"]].exp()).log().squeeze(-1)
        for name in names)
    with torch.no_grad():
        torch.testing.assert_close(mixed.log_joint(to_centered(non_centered, u, names)),
                                   non_centered.log_joint(u) - log_tau, rtol=1e-10, atol=1e-8)


def test_specimen_sd_ratio_is_the_sd_of_a_specimen_value_over_tau(problem):
    """With only the offsets uncertain (variance v each), a specimen's value has sd
    ``tau sqrt(v)``: the ratio is ``sqrt(v)``, and the rule centers below 1/sqrt(2)."""
    from bayescal.inference.parameterisation import (CENTERED_BELOW, choose_centered,
                                                     specimen_sd_ratios)

    packing = packing_for(problem)
    u = random_points(packing, 1, seed=6)[0]
    variances = {"sy": 0.04, "Rinf": 0.25, "d": 0.81, "eta": 1.0}
    diagonal = torch.zeros(packing.dim, dtype=torch.float64)
    for name, v in variances.items():
        diagonal[packing.slices()[f"{name}_offset"]] = v
    ratios = specimen_sd_ratios(packing, u, torch.diag(diagonal))
    for name, v in variances.items():
        assert math.isclose(ratios[name], math.sqrt(v), rel_tol=1e-10), (name, ratios[name])
    assert choose_centered(ratios) == {"sy", "Rinf"}
    assert math.isclose(CENTERED_BELOW, 2 ** -0.5)


def test_draws_of_one_point_are_solved_and_valued_once(problem, monkeypatch):
    """A MAP fit's draws (``unique``): one solve, and each draw's log likelihood equals that
    of the same draws taken as distinct points."""
    from bayescal.inference.draws import log_likelihood, posterior_draws

    experiments = problem
    packing = packing_for(experiments)
    h = packing.h
    point = {k: v[None].expand(3, *v.shape).clone() for k, v in packing.point(packing.u0).items()}
    solved = []
    responses = Hierarchy.responses
    monkeypatch.setattr(Hierarchy, "responses", lambda self, piece, solving=None: (
        solved.append(len(piece["noise_sd"])), responses(self, piece, solving))[1])
    same = posterior_draws(h, point, unique=True)
    distinct = posterior_draws(h, point)  # the draws' median, then the draws
    assert solved == [1, 1, 3] and same.same_point and not distinct.same_point
    torch.testing.assert_close(log_likelihood(h, same), log_likelihood(h, distinct),
                               rtol=1e-12, atol=0.0)
    assert log_likelihood(h, same).shape == (3, experiments.n_specimens)


def test_draws_started_from_their_median_give_the_cold_stress_in_fewer_iterations(
        problem, monkeypatch):
    """Distinct draws: Newton starts each from the trajectory at the draws' median, moved to
    the draw's state (:func:`posterior_draws`); the stress is a cold solve's to the solver's
    tolerance, and the draws' solve takes fewer residual evaluations (the median's own
    solve, one more, not counted: in a fit it is one of 64 paths beside batches of 1024)."""
    import bayescal.inference.draws as draws_module
    from bayescal.inference.draws import unpack_draws
    from bayescal.material import StrainControlledResidual

    packing = packing_for(problem)
    latents = unpack_draws(packing.h, packing, random_points(packing, 6, seed=3, scale=0.05))
    evaluations = []
    evaluate = StrainControlledResidual.evaluate_raw
    monkeypatch.setattr(StrainControlledResidual, "evaluate_raw", lambda self, *args: (
        evaluations.append(1), evaluate(self, *args))[1])
    centre = draws_module._centre_trajectory
    monkeypatch.setattr(draws_module, "_centre_trajectory", lambda h, latents: (
        centre(h, latents), evaluations.clear())[0])
    warm = draws_module.posterior_draws(packing.h, latents)
    warm_n = len(evaluations)
    evaluations.clear()
    monkeypatch.setattr(draws_module, "_centre_trajectory", lambda h, latents: None)
    cold = draws_module.posterior_draws(packing.h, latents)
    assert warm_n < 0.85 * len(evaluations)  # 93 against 123
    torch.testing.assert_close(warm.stress_mean, cold.stress_mean, rtol=0, atol=1e-6)
