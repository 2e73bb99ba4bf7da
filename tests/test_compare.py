"""``bayescal compare`` and misfit by label: leave-one-specimen-out PSIS-LOO of fits of the
same data, refusal of fits of different data, and the rms misfit against a hand computation."""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest

from bayescal.cli import main
from bayescal.compare import compare_fits, labels, misfit_by
from bayescal.errors import BadInput

N_SPEC, N_STEP, N_DRAW = 8, 5, 300
RATES = np.array([1e-4, 1e-4, 1e-2, 1e-2, 500.0, 500.0, 3600.0, 3600.0])


def fake_fit(loglik_mean, offset, seed=0, stress_shift=0.0, draws=N_DRAW):
    """An InferenceData laid out like a fit's: per-specimen log likelihood around
    ``loglik_mean``, predictive stress = data + ``offset`` (per specimen), one padded point."""
    rng = np.random.default_rng(seed)
    observed = 100.0 + 10.0 * np.arange(N_SPEC)[:, None] + np.arange(N_STEP)[None, :]
    observed = observed + stress_shift
    observed[0, -1] = np.nan  # padding
    predicted = observed + np.asarray(offset)[:, None]
    predicted = np.nan_to_num(predicted, nan=0.0)
    time = np.tile(np.arange(N_STEP, dtype=float), (N_SPEC, 1))
    return _build(rng, draws, predicted, observed, time, loglik_mean)


def _build(rng, draws, predicted, observed, time, loglik_mean):
    specimens = [f"S{i}" for i in range(N_SPEC)]
    coords = {"specimen": specimens, "step": np.arange(N_STEP)}
    two = ["specimen", "step"]
    idata = az.from_dict(
        posterior={"noise_sd": rng.normal(5.0, 0.1, (1, draws))},
        posterior_predictive={"stress": predicted[None, None] + rng.normal(
            0, 1e-3, (1, draws, N_SPEC, N_STEP))},
        log_likelihood={"stress": rng.normal(loglik_mean, 0.3, (1, draws, N_SPEC))},
        observed_data={"stress": observed},
        constant_data={"time": time, "strain": time * 0.01,
                       "temperature": np.full((N_SPEC, N_STEP), 297.04),
                       "strain_rate": RATES},
        coords=coords,
        dims={"stress": two, "time": two, "strain": two, "temperature": two,
              "strain_rate": ["specimen"]},
    )
    return idata


OFFSETS = np.array([3.0, -3.0, 4.0, 4.0, 10.0, -10.0, 20.0, 0.0])


def test_misfit_by_label_and_specimen_against_hand_computation():
    idata = fake_fit(-10.0, OFFSETS)
    table = misfit_by(idata, "strain_rate")
    # specimen 0 has one padded point (4 points), the rest 5
    assert table.loc[1e-4, "points"] == 9 and table.loc[1e-4, "specimens"] == 2
    assert table.loc[1e-4, "rms"] == pytest.approx(3.0, abs=1e-3)
    assert table.loc[500.0, "rms"] == pytest.approx(10.0, abs=1e-3)
    assert table.loc[3600.0, "rms"] == pytest.approx(np.sqrt((20.0**2 + 0.0) / 2), abs=1e-3)
    per = misfit_by(idata, "specimen")
    np.testing.assert_allclose(per["rms"].values, np.abs(OFFSETS), atol=1e-3)
    # temperature: each specimen's first point, rounded to 0.1 K
    assert list(labels(idata)["temperature"]) == [297.0] * N_SPEC
    assert misfit_by(idata, "temperature").loc[297.0, "points"] == N_SPEC * N_STEP - 1
    with pytest.raises(BadInput, match="no label 'heat'.*labels: specimen, strain_rate"):
        misfit_by(idata, "heat")


def test_compare_ranks_the_better_predictive_fit_and_refuses_other_data():
    good, poor = fake_fit(-10.0, OFFSETS, seed=1), fake_fit(-14.0, 2 * OFFSETS, seed=2)
    table, high = compare_fits({"good": good, "poor": poor})
    assert list(table.index) == ["good", "poor"]
    # elpd is the sum over specimens of the log mean likelihood: about -10 * 8 vs -14 * 8
    assert table.loc["good", "elpd_loo"] == pytest.approx(-80.0, abs=1.5)
    assert table.loc["poor", "elpd_diff"] == pytest.approx(32.0, abs=1.5)
    assert table["weight"].sum() == pytest.approx(1.0)
    assert table.loc["good", "weight"] > 0.99
    assert high == {"good": 0, "poor": 0}
    other = fake_fit(-10.0, OFFSETS, stress_shift=1.0)
    with pytest.raises(BadInput, match="different data"):
        compare_fits({"good": good, "other": other})
    with pytest.raises(BadInput, match="one posterior draw"):
        compare_fits({"good": good, "map": fake_fit(-10.0, OFFSETS, draws=1)})


def test_cli_compare_prints_table_misfit_and_writes_the_figure(tmp_path, capsys):
    paths = []
    for name, fit in (("iso", fake_fit(-12.0, 2 * OFFSETS, seed=3)),
                      ("thermal", fake_fit(-10.0, OFFSETS, seed=4))):
        (tmp_path / name).mkdir()
        fit.to_netcdf(tmp_path / name / "posterior.nc")
        paths.append(tmp_path / name / "posterior.nc")
    fig = tmp_path / "figs" / "compare.png"
    status = main(["compare", *map(str, paths), "--out", str(fig)])
    out, err = capsys.readouterr()
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("leave-one-specimen-out PSIS-LOO over 8 specimens")
    assert lines[2].split()[0] == "thermal" and lines[3].split()[0] == "iso"
    assert "by strain_rate" in out and "by temperature" in out
    row = next(line for line in lines if line.startswith("3600 "))
    assert row.split()[-2:] == ["28.28", "14.14"]  # rms iso, rms thermal
    assert fig.exists() and fig.stat().st_size > 1000
    # fits of different data: one line, exit 2
    (tmp_path / "other").mkdir()
    fake_fit(-10.0, OFFSETS, stress_shift=5.0).to_netcdf(tmp_path / "other" / "posterior.nc")
    status = main(["compare", str(paths[0]), str(tmp_path / "other" / "posterior.nc")])
    out, err = capsys.readouterr()
    assert status == 2 and len(err.strip().splitlines()) == 1 and "different data" in err
    status = main(["compare", str(paths[0])])
    out, err = capsys.readouterr()
    assert status == 2 and "at least two fits" in err
    status = main(["summary", str(paths[1]), "--by", "strain_rate", "--by", "specimen"])
    out, err = capsys.readouterr()
    assert status == 0 and "by strain_rate" in out and "S7" in out
    status = main(["summary", str(paths[1]), "--by", "heat"])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and "no label 'heat'" in err

