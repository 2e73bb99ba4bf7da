"""Pareto k-hat of approximate posteriors, importance resampling, and the verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bayescal.card import load_card
from bayescal.cli import main
from bayescal.check import informative_path
from bayescal.errors import BayescalWarning
from bayescal.fit import fit
from bayescal.hierarchy import Hierarchy
from bayescal.inference import importance
from bayescal.inference.draws import log_likelihood, posterior_draws, sample_guide, unpack_draws
from bayescal.inference.laplace import MAPConfig
from bayescal.inference.packing import Packing, initial_values
from bayescal.inference.svi import SVIConfig, run_svi
from bayescal.summary import format_summary
from bayescal.testing import CARD, synthetic


def gaussian_log_ratios(q_sd: float, p_sd: float, n: int = 2000, dim: int = 1, seed: int = 0):
    """Log ratios log p - log q of n draws from q = N(0, q_sd^2 I), p = N(0, p_sd^2 I)."""
    generator = torch.Generator().manual_seed(seed)
    x = q_sd * torch.randn(n, dim, generator=generator, dtype=torch.float64)
    p = torch.distributions.Normal(0.0, p_sd).log_prob(x).sum(-1)
    q = torch.distributions.Normal(0.0, q_sd).log_prob(x).sum(-1)
    return (p - q).numpy()


def test_k_hat_small_for_an_exact_or_wider_gaussian_and_large_for_a_too_narrow_one():
    # q = p: every ratio is 1; q a little wider than p: bounded ratios (k <= 0 in theory)
    _, k_exact = importance.pareto_smooth(gaussian_log_ratios(1.0, 1.0, dim=5))
    _, k_wide = importance.pareto_smooth(gaussian_log_ratios(1.2, 1.0, dim=5))
    assert k_exact < importance.K_RELIABLE and k_wide < importance.K_RELIABLE
    # q narrower than p by 3 in one dimension: p/q ~ exp(4 x^2 / 9 ...) has tail index
    # k = 1 - (q_sd / p_sd)^2 = 0.89
    log_weight, k_narrow = importance.pareto_smooth(gaussian_log_ratios(1.0, 3.0))
    assert k_narrow > importance.K_USABLE
    assert math.isclose(np.logaddexp.reduce(log_weight), 0.0, abs_tol=1e-12)


def test_failed_draws_keep_weight_zero():
    log_ratio = gaussian_log_ratios(1.2, 1.0, n=500)
    log_ratio[[3, 7]] = -np.inf
    log_weight, k = importance.pareto_smooth(log_ratio)
    assert np.isneginf(log_weight[[3, 7]]).all() and np.isfinite(k)
    assert math.isclose(np.logaddexp.reduce(log_weight), 0.0, abs_tol=1e-12)


def test_systematic_resampling_by_hand():
    # weights 0.1, 0.2, 0.3, 0.4 of 10 draws: exactly 1, 2, 3 and 4 copies, whatever the offset
    index = importance.resample(np.log([0.1, 0.2, 0.3, 0.4]), 10, seed=3)
    assert np.bincount(index, minlength=4).tolist() == [1, 2, 3, 4]
    # weights 0.05, 0.95 of 10 draws: positions (U + j) / 10; the first draw is chosen once
    # when U / 10 < 0.05, else never
    offset = np.random.default_rng(8).uniform()
    index = importance.resample(np.log([0.05, 0.95]), 10, seed=8)
    assert np.bincount(index, minlength=2).tolist() == ([1, 9] if offset < 0.5 else [0, 10])
    # unnormalised log weights give the same draws
    np.testing.assert_array_equal(importance.resample(np.log([2.0, 4, 6, 8]), 10, seed=3),
                                  importance.resample(np.log([0.1, 0.2, 0.3, 0.4]), 10, seed=3))


def test_correct_resamples_only_below_0_7_and_when_enabled():
    weights = np.log([0.1, 0.2, 0.3, 0.4])
    check = importance.ImportanceCheck(log_ratio=weights + 5.0, log_weight=weights,
                                       pareto_k=0.6, failed=0)
    kept, attrs, stats = importance.correct(check, seed=3)
    assert attrs["importance_resampled"] and attrs["pareto_k"] == 0.6
    assert math.isclose(attrs["importance_ess"], 1 / (0.01 + 0.04 + 0.09 + 0.16))
    index = importance.resample(weights, 4, seed=3)
    np.testing.assert_array_equal(kept, index)
    np.testing.assert_allclose(stats["log_weight"], weights[index][None])
    assert stats["log_ratio"].shape == (1, 4)
    for k, enabled in ((0.75, True), (0.3, False)):
        bad = importance.ImportanceCheck(log_ratio=weights, log_weight=weights, pareto_k=k,
                                         failed=0)
        kept, attrs, stats = importance.correct(bad, seed=3, enabled=enabled)
        assert not attrs["importance_resampled"]
        np.testing.assert_array_equal(kept, np.arange(4))
        np.testing.assert_allclose(stats["log_weight"][0], weights)


def test_verdicts_name_what_to_do():
    assert importance.verdict(0.3).startswith("reliable")
    assert importance.verdict(0.6).startswith("usable with importance correction")
    bad = importance.verdict(0.9, "normal")
    assert bad.startswith("unreliable") and "--guide mvn" in bad and "--method nuts" in bad
    full_rank = importance.verdict(0.9, "mvn")
    assert "--guide mvn" not in full_rank and "--method nuts" in full_rank


@pytest.fixture(scope="module")
def laplace_fit():
    """The Laplace approximation (full rank) of 3 specimens, few points."""
    experiments, _ = synthetic(3, seed=5, points_per_segment=8)
    h = Hierarchy(load_card(CARD), experiments)
    result = run_svi(h, SVIConfig(guide="mvn"), MAPConfig(iterations=20), seed=1,
                     progress=False, svi_stage=False)
    return result


def test_log_ratios_of_the_model_are_the_densities_of_the_packed_vector(laplace_fit):
    h, guide = laplace_fit.hierarchy, laplace_fit.guide
    packing = Packing(h, initial_values(h))
    latents = sample_guide(h, guide, 6, seed=2)
    u = packing.pack(latents)
    back = unpack_draws(h, packing, u)
    for name, value in latents.items():
        torch.testing.assert_close(back[name], value, rtol=1e-12, atol=1e-12)
    # q: the Laplace Gaussian at the MAP point
    u_map, covariance = laplace_fit.state.u_map, laplace_fit.state.covariance
    log_q = importance.guide_log_density(guide, packing, u)
    expected = torch.distributions.MultivariateNormal(u_map, covariance).log_prob(u)
    torch.testing.assert_close(log_q, expected, rtol=1e-9, atol=1e-9)
    # p: the log joint, in pieces of any size
    torch.testing.assert_close(importance.log_joint(packing, u, max_batch=3 * 2),
                               packing.log_joint(u).detach(), rtol=1e-10, atol=1e-8)
    # p from the draws' stress, solved once for the stored posterior (the fit's route)
    solved = importance.check_approximation(packing, guide, latents)
    draws = posterior_draws(h, latents)
    reused = importance.check_approximation(packing, guide, latents,
                                            log_likelihood=log_likelihood(h, draws).sum(-1))
    # (the draws' solves start from their median's trajectory, the check's cold: they agree
    # to the solver's tolerance, 1.6e-6 nats at most here)
    np.testing.assert_allclose(reused.log_ratio, solved.log_ratio, rtol=1e-8, atol=1e-5)
    assert np.ptp(solved.log_ratio) > 0.1  # the draws' ratios differ: a real comparison


def test_mean_field_normal_guide_has_its_own_density(laplace_fit):
    h = laplace_fit.hierarchy
    from bayescal.inference.guides import make_guide

    packing = Packing(h, initial_values(h))
    u_map, covariance = laplace_fit.state.u_map, laplace_fit.state.covariance
    guide = make_guide(h, "normal", packing, u_map, covariance)
    latents = sample_guide(h, guide, 5, seed=4)
    u = packing.pack(latents)
    expected = torch.distributions.Normal(u_map, covariance.diagonal().sqrt()).log_prob(u).sum(-1)
    torch.testing.assert_close(importance.guide_log_density(guide, packing, u), expected,
                               rtol=1e-9, atol=1e-9)


def test_fit_stores_k_hat_weights_and_a_verdict(capsys):
    """A mean-field Laplace fit ignores the strong specimen-level correlations: k-hat far
    above 0.7 (measured 166 on 4 specimens), draws not resampled, summary says so."""
    experiments, _ = synthetic(3, seed=5, points_per_segment=8)
    config = SVIConfig(guide="normal")
    idata = fit(load_card(CARD), experiments, method="laplace", config=config,
                map_config=MAPConfig(iterations=20), draws=200, seed=1, progress=False)
    attrs = idata.posterior.attrs
    assert attrs["pareto_k"] > importance.K_USABLE
    assert attrs["importance_resampled"] == 0
    assert idata.sample_stats["log_weight"].shape == (1, 200)
    log_weight = idata.sample_stats["log_weight"].values[0]
    assert math.isclose(np.logaddexp.reduce(log_weight), 0.0, abs_tol=1e-9)
    text = format_summary(idata)
    assert f"Pareto k-hat {attrs['pareto_k']:.2f} (stored draws not resampled" in text
    assert "unreliable" in text and "--method nuts" in text


def test_centered_gaussian_approximation_is_flagged_in_fit_and_summary():
    """A Laplace fit of centered specimen values: k-hat may pass while the specimens'
    intervals are too narrow (benchmarks/heldout.py), so fit warns and summary says so."""
    experiments, _ = synthetic(3, seed=5, points_per_segment=8)
    caution = ("laplace with centered specimen values (Rinf, d, eta, sy): a Gaussian at the "
               "centered mode pulls the specimens toward their population, so their intervals "
               "are too narrow, and k-hat does not show it; drop --centered (laplace and svi "
               "work non-centered by default) or use --method nuts")
    with pytest.warns(BayescalWarning) as caught:
        idata = fit(load_card(CARD), experiments, method="laplace", centered=True,
                    map_config=MAPConfig(iterations=20), draws=100, seed=1, progress=False)
    assert caution in [str(w.message) for w in caught]
    assert caution in idata.posterior.attrs["warnings"].split("\n")
    assert format_summary(idata).splitlines()[-1] == caution


@pytest.mark.slow
def test_no_importance_from_the_command_line(capsys, tmp_path):
    """``--no-importance`` keeps the guide's draws; fit and summary print k-hat and verdict."""
    time, strain = informative_path(6)
    load = tmp_path / "load.csv"
    load.write_text("time,strain\n" + "".join(f"{t!r},{e!r}\n" for t, e in
                                                zip(time.tolist(), strain.tolist())))
    data = tmp_path / "data.csv"
    assert main(["simulate", CARD, "--load", str(load), "--specimens", "3", "--seed", "2",
                 "--noise", "2", "--out", str(data)]) == 0
    out = tmp_path / "fit"
    capsys.readouterr()
    status = main(["fit", CARD, "--data", str(data), "--method", "laplace", "--draws", "50",
                   "--no-importance", "--no-figures", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert status == 0
    import arviz as az

    attrs = az.from_netcdf(out / "posterior.nc").posterior.attrs
    assert attrs["importance_resampled"] == 0
    line = f"Pareto k-hat {attrs['pareto_k']:.2f} (stored draws not resampled"
    assert line in stdout
    assert main(["summary", str(out / "posterior.nc"), "--population"]) == 0
    summary = capsys.readouterr().out
    assert line in summary and importance.verdict(attrs["pareto_k"], "mvn") in summary
