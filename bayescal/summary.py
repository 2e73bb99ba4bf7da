"""Posterior summaries: means, sd and 90% intervals from ArviZ, with the run's context."""

from __future__ import annotations

import warnings
from pathlib import Path

import arviz as az
import pandas as pd

from bayescal.errors import BadInput

HDI_PROB = 0.9


def load_posterior(path: str | Path) -> az.InferenceData:
    """Read a ``posterior.nc``, with one clear error when it is missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        idata = az.from_netcdf(path)
    except Exception as exc:  # h5/netCDF errors have many types
        raise BadInput(f"{path}: not a readable netCDF InferenceData ({exc})") from None
    if "posterior" not in idata.groups() or "noise_sd" not in idata.posterior:
        raise BadInput(f"{path}: not a bayescal posterior (no posterior group with noise_sd)")
    return idata


def summary_table(idata: az.InferenceData, population_only: bool = False) -> pd.DataFrame:
    """Mean, sd and 90% highest-density interval of every posterior variable (or only the
    population-level ones), plus R-hat and ESS when there are several chains."""
    names = list(idata.posterior.data_vars)
    if population_only:
        names = [n for n in names if "specimen" not in idata.posterior[n].dims]
    several_chains = idata.posterior.sizes["chain"] > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.summary(idata, var_names=names, hdi_prob=HDI_PROB,
                          kind="all" if several_chains else "stats", round_to=4)


def format_summary(idata: az.InferenceData, population_only: bool = False) -> str:
    """The summary table with a header naming the run."""
    attrs = idata.posterior.attrs
    head = (f"method {attrs.get('method', '?')}"
            + (f" (guide {attrs['guide']})" if attrs.get("method") != "nuts" else "")
            + f", model {attrs.get('model', '?')}, {idata.posterior.sizes['chain']} chain(s) x "
            f"{idata.posterior.sizes['draw']} draws, {attrs.get('steps', '?')} steps, "
            f"seed {attrs.get('seed', '?')}")
    table = summary_table(idata, population_only)
    with pd.option_context("display.max_rows", None, "display.width", 120):
        return f"{head}\n{table.to_string()}"
