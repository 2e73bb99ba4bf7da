"""Comparing fits of the same data: leave-one-specimen-out PSIS-LOO and misfit by label.

A fit stores each specimen's log likelihood summed over its points
(``log_likelihood.stress``, dims ``specimen``), so PSIS-LOO over that dimension estimates how
well each model predicts a *new specimen's* whole curve: the question a calibration answers,
where leaving out single points of a curve (strongly correlated with their neighbours)
would reward over-fitting. :func:`compare_fits` hands these to :func:`arviz.compare`
(stacking weights); :func:`misfit_by` is the rms of data minus the posterior-predictive mean
grouped by a label column, where a model's misfit concentrates.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from bayescal.arviz_import import az
import numpy as np
import pandas as pd

from bayescal.errors import BadInput

#: Pareto k above this: PSIS-LOO's estimate for that specimen is unreliable (Vehtari et al.
#: 2024, for the few hundred draws a fit stores).
PARETO_K_LIMIT = 0.7
#: Temperatures (K) are grouped to this many decimals (a converted Rankine reading differs
#: in its last digits).
TEMPERATURE_DECIMALS = 1


def labels(idata: az.InferenceData) -> dict[str, np.ndarray]:
    """A fit's per-specimen labels: the numeric label columns stored with its data and, where
    the data had temperatures, ``temperature`` at each specimen's first point."""
    out = {}
    if "constant_data" not in idata.groups():
        return out
    data = idata.constant_data
    for name, var in data.data_vars.items():
        if var.dims == ("specimen",):
            out[name] = var.values
    if "temperature" in data:
        out["temperature"] = np.round(data["temperature"].values[:, 0], TEMPERATURE_DECIMALS)
    return out


def misfit_by(idata: az.InferenceData, by: str) -> pd.DataFrame:
    """Rms of observed minus posterior-predictive mean stress (MPa) over the recorded points of
    the specimens of each value of label ``by`` (or of each specimen, ``by = "specimen"``):
    columns ``specimens``, ``points``, ``rms``, indexed by the label's values."""
    for group in ("observed_data", "posterior_predictive"):
        if group not in idata.groups():
            raise BadInput(f"the fit has no {group} group: cannot compute its misfit")
    observed = idata.observed_data["stress"].values
    predicted = idata.posterior_predictive["stress"].mean(dim=("chain", "draw")).values
    specimens = idata.observed_data["specimen"].values
    if by == "specimen":
        keys = specimens
    else:
        known = labels(idata)
        if by not in known:
            names = ", ".join(["specimen", *known]) or "specimen"
            raise BadInput(f"no label {by!r} in the fit's data (labels: {names})")
        keys = known[by]
    residual = observed - predicted
    rows = {}
    for key in pd.unique(keys):
        rows_of = keys == key
        r = residual[rows_of]
        r = r[np.isfinite(r)]
        rows[key] = (int(rows_of.sum()), r.size, float(np.sqrt(np.mean(r**2))) if r.size
                     else float("nan"))
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["specimens", "points", "rms"])
    table.index.name = by
    return table.sort_index() if by != "specimen" else table


def _same_data(fits: dict[str, az.InferenceData], paths: dict[str, str]) -> None:
    """One clear error unless every fit saw the same specimens, paths and stresses."""
    names = list(fits)
    first = fits[names[0]]
    for name in names[1:]:
        other = fits[name]
        where = f"{paths[name]} and {paths[names[0]]}"
        a, b = first.observed_data, other.observed_data
        if list(a["specimen"].values) != list(b["specimen"].values):
            raise BadInput(f"{where} are fits of different data (different specimens): "
                           "compare only fits of the same data")
        same = (a["stress"].shape == b["stress"].shape
                and np.array_equal(a["stress"].values, b["stress"].values, equal_nan=True))
        for var in ("time", "strain"):
            same = same and np.array_equal(first.constant_data[var].values,
                                           other.constant_data[var].values, equal_nan=True)
        if not same:
            raise BadInput(f"{where} are fits of different data (the stresses or load paths "
                           "differ): compare only fits of the same data")


def fit_names(paths: Sequence[str]) -> list[str]:
    """A short name for each fit: the folder of its ``posterior.nc`` (the path where two
    folders share a name)."""
    from pathlib import Path

    short = [Path(p).parent.name or Path(p).stem for p in paths]
    return short if len(set(short)) == len(short) else [str(p) for p in paths]


def compare_fits(fits: dict[str, az.InferenceData], paths: dict[str, str] | None = None
                 ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Leave-one-specimen-out PSIS-LOO of fits of the same data (:func:`arviz.compare`,
    stacking weights); returns the table (best first) and, per fit, the number of specimens
    whose Pareto k exceeds :data:`PARETO_K_LIMIT`."""
    paths = paths or {name: name for name in fits}
    if len(fits) < 2:
        raise BadInput("compare needs at least two fits")
    for name, idata in fits.items():
        if "log_likelihood" not in idata.groups() or "stress" not in idata.log_likelihood:
            raise BadInput(f"{paths[name]}: no log_likelihood.stress: not a bayescal fit")
        if idata.log_likelihood.sizes["chain"] * idata.log_likelihood.sizes["draw"] < 2:
            raise BadInput(f"{paths[name]}: one posterior draw (a MAP fit): PSIS-LOO needs "
                           "draws (fit with --method laplace, svi or nuts)")
    _same_data(fits, paths)
    high = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Pareto k warnings are reported per fit below
        for name, idata in fits.items():
            loo = az.loo(idata, pointwise=True, var_name="stress")
            high[name] = int((loo.pareto_k.values > PARETO_K_LIMIT).sum())
        table = az.compare(fits, ic="loo", method="stacking", var_name="stress")
    return table, high


def format_comparison(table: pd.DataFrame, high: dict[str, int], n_specimens: int) -> str:
    """The comparison as text: elpd, its se, the difference to the best and its se, stacking
    weights, effective parameters, and a line per fit with unreliable Pareto k."""
    shown = table[["rank", "elpd_loo", "se", "elpd_diff", "dse", "weight", "p_loo"]].copy()
    shown.columns = ["rank", "elpd_loo", "se", "elpd_diff", "diff_se", "weight", "p_loo"]
    with pd.option_context("display.width", 120, "display.float_format", "{:.4g}".format):
        lines = [f"leave-one-specimen-out PSIS-LOO over {n_specimens} specimens "
                 "(elpd: log predictive density of a left-out specimen's curve, higher is "
                 "better)", shown.to_string()]
    for name, count in high.items():
        if count:
            lines.append(f"warning: {name}: Pareto k above {PARETO_K_LIMIT} for {count} of "
                         f"{n_specimens} specimens: PSIS-LOO is unreliable for them (their "
                         "curves pull the posterior strongly); treat its elpd with caution")
    return "\n".join(lines)


def format_misfit(fits: dict[str, az.InferenceData], by: str) -> str:
    """Misfit of every fit by one label, side by side (MPa)."""
    tables = [misfit_by(idata, by) for idata in fits.values()]
    joined = pd.concat([tables[0][["specimens", "points"]]]
                       + [t["rms"].rename(f"rms {name}".strip()) for name, t in zip(fits, tables)],
                       axis=1)
    joined.index = [f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)
                    for v in joined.index]
    joined.index.name = by
    with pd.option_context("display.width", 160, "display.max_rows", None,
                           "display.float_format", "{:.2f}".format):
        return f"rms of data minus posterior-predictive mean (MPa) by {by}\n{joined.to_string()}"


def plot_comparison(table: pd.DataFrame, out: str) -> None:
    """ArviZ's compare plot (elpd with its se, differences to the best) written atomically
    to ``out`` in the format of its suffix."""
    import matplotlib.pyplot as plt

    from bayescal.plots import save_figure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas deprecations inside ArviZ
        ax = az.plot_compare(table.copy(), insample_dev=False, show=False)
    ax.set_xlabel("elpd (leave-one-specimen-out PSIS-LOO)")
    try:
        save_figure(ax.figure, out)
    finally:
        plt.close(ax.figure)
