"""Fitting: recovery of known truths, interval coverage, export contract, seeds, resume."""

from __future__ import annotations

import dataclasses

import arviz as az
import numpy as np
import pytest
import torch

from bayescal.card import load_card
from bayescal.fit import fit, fit_to_directory
from bayescal.hierarchy import Hierarchy
from bayescal.inference.laplace import MAPConfig
from bayescal.inference.svi import SVIConfig

from bayescal.testing import CARD, NOISE, TRUE_CV, TRUE_MEANS, synthetic  # noqa: F401


@pytest.fixture(scope="module")
def small_problem():
    return synthetic(3, seed=5, points_per_segment=8)


QUICK = SVIConfig(guide="mvn", steps=30, min_steps=10, particles=2)
QUICK_MAP = MAPConfig(iterations=8)


@pytest.fixture(scope="module")
def small_fit(small_problem):
    experiments, _ = small_problem
    return fit(load_card(CARD), experiments, method="svi", config=QUICK, map_config=QUICK_MAP,
               draws=40, seed=3, progress=False, command="bayescal fit test")


def test_export_contract_field_by_field(small_fit, small_problem):
    experiments, _ = small_problem
    idata = small_fit
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "log_likelihood",
                                   "observed_data", "constant_data", "sample_stats"}
    # an approximation's check: k-hat, and each stored draw's log ratio and smoothed weight
    assert set(idata.sample_stats.data_vars) == {"log_ratio", "log_weight"}
    assert idata.sample_stats["log_weight"].dims == ("chain", "draw")
    assert idata.sample_stats["log_weight"].shape == (1, 40)
    assert np.isfinite(idata.posterior.attrs["pareto_k"])
    assert idata.posterior.attrs["importance_resampled"] == int(
        idata.posterior.attrs["pareto_k"] < 0.7)
    post = idata.posterior
    names = ["sy", "Rinf", "d", "eta"]
    expected = {n for n in names} | {f"{n}_pop_{s}" for n in names
                                     for s in ("mean", "sd", "loc", "scale")}
    assert set(post.data_vars) == expected | {"noise_sd"}
    assert post["sy"].dims == ("chain", "draw", "specimen")
    assert post["sy_pop_mean"].dims == ("chain", "draw")
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == 40
    assert list(post["specimen"].values) == list(experiments.specimens)
    n_steps = experiments.n_steps
    assert idata.posterior_predictive["stress"].dims == ("chain", "draw", "specimen", "step")
    assert idata.posterior_predictive["stress"].shape == (1, 40, 3, n_steps)
    assert idata.log_likelihood["stress"].dims == ("chain", "draw", "specimen")
    assert idata.observed_data["stress"].dims == ("specimen", "step")
    np.testing.assert_allclose(idata.observed_data["stress"].values, experiments.stress.T.numpy())
    np.testing.assert_allclose(idata.constant_data["time"].values, experiments.time.T.numpy())
    np.testing.assert_allclose(idata.constant_data["strain"].values, experiments.strain.T.numpy())
    attrs = post.attrs
    for key in ("method", "guide", "steps", "n_chunk", "seed", "wall_time_s", "solver_retries",
                "versions", "command", "elbo"):
        assert key in attrs, key
    assert attrs["method"] == "svi" and attrs["guide"] == "mvn" and attrs["seed"] == 3
    assert attrs["command"] == "bayescal fit test"
    # physical values stay inside the card's bounds
    assert float(post["sy"].min()) > 100.0 and float(post["sy"].max()) < 600.0
    # ArviZ accepts it
    assert "sy_pop_mean" in az.summary(idata, var_names=["sy_pop_mean"]).index
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)


def test_log_likelihood_is_the_sum_over_steps(small_fit, small_problem):
    """log_likelihood per specimen = sum over recorded steps of Normal(mean, noise) at the data,
    checked for one draw against the predictive mean recomputed independently."""
    experiments, _ = small_problem
    post = small_fit.posterior
    spec = load_card(CARD)
    values = {k: torch.as_tensor(post[k].values[0, :1]) for k in ("sy", "Rinf", "d", "eta")}
    mean = Hierarchy(spec, experiments).solve_stress(values, adjoint=False)[0][0]
    noise = float(post["noise_sd"].values[0, 0])
    expected = torch.distributions.Normal(mean, noise).log_prob(experiments.stress.T).sum(-1)
    np.testing.assert_allclose(small_fit.log_likelihood["stress"].values[0, 0],
                               expected.numpy(), rtol=1e-8)


def test_same_seed_same_numbers(small_problem, small_fit):
    experiments, _ = small_problem
    again = fit(load_card(CARD), experiments, method="svi", config=QUICK, map_config=QUICK_MAP,
                draws=40, seed=3, progress=False, command="bayescal fit test")
    for name in ("sy", "sy_pop_mean", "noise_sd"):
        np.testing.assert_array_equal(again.posterior[name].values, small_fit.posterior[name].values)


def test_map_is_one_point_with_noise_only_bands(small_problem):
    experiments, _ = small_problem
    idata = fit(load_card(CARD), experiments, method="map", config=QUICK, map_config=QUICK_MAP, draws=20,
                progress=False)
    assert idata.posterior.attrs["guide"] == "delta"
    assert float(idata.posterior["sy"].std(dim=("chain", "draw")).max()) < 1e-9
    assert float(idata.posterior_predictive["stress"].std(dim=("chain", "draw")).mean()) > 0.5


@pytest.mark.slow
def test_resume_continues_from_checkpoint_and_keeps_old_posterior(tmp_path, small_problem):
    experiments, _ = small_problem
    spec = load_card(CARD)
    out = tmp_path / "fit"
    config = dataclasses.replace(QUICK, steps=40, min_steps=40, checkpoint_every=10)
    first = fit_to_directory(spec, experiments, out, figures=False, method="svi", config=config,
                             map_config=QUICK_MAP, draws=10, progress=False)
    before = (out / "posterior.nc").read_bytes()

    # A killed run: interrupt the SVI stage after 25 steps; checkpoints exist at 10 and 20.
    import bayescal.inference.svi as svi

    calls = {"n": 0}
    original = svi.Trace_ELBO.differentiable_loss

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    svi.Trace_ELBO.differentiable_loss = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            fit_to_directory(spec, experiments, out, figures=False, method="svi",
                             config=config, map_config=QUICK_MAP, draws=10, progress=False,
                             seed=1)
    finally:
        svi.Trace_ELBO.differentiable_loss = original
    assert (out / "posterior.nc").read_bytes() == before, "a killed run changed posterior.nc"

    resumed = fit_to_directory(spec, experiments, out, figures=False, method="svi",
                               config=config, map_config=QUICK_MAP, draws=10, progress=False,
                               seed=1, resume=True)
    map_evals = len(first.posterior.attrs["log_joint_map"])
    assert resumed.posterior.attrs["resumed_from"] == map_evals + 20
    assert resumed.posterior.attrs["steps"] == map_evals + 40


@pytest.mark.slow
def test_recovery_and_coverage_mvn():
    """12 specimens (the problem of benchmarks/svi.py) from a known population on the
    informative path: population means within
    5%, noise within 30%, and the 90% intervals of the specimen values cover at least 75% of
    the truths."""
    experiments, truth = synthetic(12, seed=11)
    idata = fit(load_card(CARD), experiments, method="svi", config=SVIConfig(guide="mvn"),
                draws=400, seed=0, progress=False)
    post = idata.posterior
    inside = []
    for name, mean in TRUE_MEANS.items():
        estimate = float(post[f"{name}_pop_mean"].mean())
        sample_mean = float(truth[name].mean())
        lo, hi = post[name].quantile([0.05, 0.95], dim=("chain", "draw")).values
        inside.append((truth[name].numpy() >= lo) & (truth[name].numpy() <= hi))
        print(f"{name}: pop mean {estimate:.2f}, truth {mean:g} ({estimate / mean - 1:+.2%}), "
              f"sample mean {sample_mean:.2f} ({estimate / sample_mean - 1:+.2%}), "
              f"coverage {inside[-1].mean():.2f}")
        assert abs(estimate / mean - 1) < 0.05, (name, estimate, mean)
        assert abs(estimate / sample_mean - 1) < 0.05, (name, estimate, sample_mean)
    noise = float(post["noise_sd"].mean())
    coverage = float(np.concatenate(inside).mean())
    print(f"noise {noise:.3f} (truth {NOISE}), coverage {coverage:.2f}")
    assert abs(noise / NOISE - 1) < 0.3
    assert coverage >= 0.75, coverage


@pytest.mark.parametrize("centered", [False, True])
def test_coloured_hessian_equals_the_dense_one(centered):
    """The block-arrow colouring (2 x (shared + kinds) points) and the noise's exact column
    give the Hessian that central differences of every coordinate (2 x dim points) give."""
    from bayescal.inference.laplace import gradient_and_hessian
    from bayescal.inference.packing import Packing, initial_values

    experiments, _ = synthetic(4, seed=1, points_per_segment=6)
    h = Hierarchy(load_card(CARD), experiments, centered=centered)
    packing = Packing(h, initial_values(h))
    u = packing.u0 + 0.3 * torch.randn(packing.dim, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64)
    _, grad, coloured = gradient_and_hessian(packing, u, 1e-4)
    dim, step = packing.dim, 1e-4
    rows = torch.cat([u[None], u + step * torch.eye(dim), u - step * torch.eye(dim)])
    rows = rows.detach().requires_grad_(True)
    packing.log_joint(rows).sum().backward()
    dense = -(rows.grad[1:dim + 1] - rows.grad[dim + 1:]) / (2 * step)
    dense = 0.5 * (dense + dense.T)
    assert packing.specimen_indices().shape == (4, 4)
    assert float((coloured - dense).abs().max() / dense.abs().max()) < 1e-7
    # the two batches (36 and 204 paths) are solved in chunks of different lengths
    # (integrate.chunk_steps): equal to the Newton tolerance, not to rounding
    torch.testing.assert_close(grad, rows.grad[0], rtol=1e-8, atol=1e-8)


def test_numeric_labels_are_exported_and_grouped_in_a_figure(tmp_path, small_problem):
    """A numeric label (strain_rate) goes to constant_data (dims specimen) and gives one
    figure panel per value; a text label does neither."""
    experiments, _ = small_problem
    labelled = dataclasses.replace(experiments, labels={"strain_rate": (1e-3, 1e-3, 1.0),
                                                        "heat": ("A", "B", "A")})
    config = dataclasses.replace(QUICK, guide="delta")
    idata = fit_to_directory(load_card(CARD), labelled, tmp_path, method="map", config=config,
                             map_config=QUICK_MAP,
                             draws=5, seed=0, progress=False)
    rate = idata.constant_data["strain_rate"]
    assert rate.dims == ("specimen",)
    np.testing.assert_array_equal(rate.values, [1e-3, 1e-3, 1.0])
    assert "heat" not in idata.constant_data
    assert (tmp_path / "fit_bands_by_strain_rate.png").stat().st_size > 10_000
    assert not (tmp_path / "fit_bands_by_heat.png").exists()
