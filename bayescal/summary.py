"""Posterior summaries: means, sd and 90% intervals from ArviZ, with the run's context, and
for samplers the convergence diagnostics (R-hat, bulk and tail ESS, MCSE, divergences) with
plain-word warnings; for approximations (laplace, svi) the Pareto k-hat of their importance
ratios with a plain-word verdict (:mod:`bayescal.inference.importance`)."""

from __future__ import annotations

import warnings
from pathlib import Path

from bayescal.arviz_import import az
import pandas as pd

from bayescal.errors import BadInput
from bayescal.export import LATENT_SUFFIXES

HDI_PROB = 0.9
#: R-hat above this says the chains have not mixed (Vehtari et al. 2021).
RHAT_LIMIT = 1.01
#: Bulk or tail ESS below this many per chain is too few for stable intervals.
ESS_PER_CHAIN = 100


def load_posterior(path: str | Path) -> az.InferenceData:
    """Read a ``posterior.nc``, with one clear error when it is missing or not ours."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path}: not a regular file")
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
    names = [n for n in idata.posterior.data_vars if not n.endswith(LATENT_SUFFIXES)]
    if population_only:
        names = [n for n in names if "specimen" not in idata.posterior[n].dims]
    several_chains = idata.posterior.sizes["chain"] > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.summary(idata, var_names=names, hdi_prob=HDI_PROB,
                          kind="all" if several_chains else "stats", round_to=4)


def diagnostics(idata: az.InferenceData, table: pd.DataFrame) -> list[str]:
    """Plain-word warnings about a sampler's run: R-hat, ESS, divergences, solver failures."""
    lines = []
    if "r_hat" in table:
        chains = idata.posterior.sizes["chain"]

        def worst(column, bad, ascending):
            rows = table[bad].sort_values(column, ascending=ascending)
            listed = ", ".join(f"{name} ({value:.3g})" for name, value in rows[column][:4].items())
            return listed + (f" and {len(rows) - 4} more" if len(rows) > 4 else "")

        high = table["r_hat"] > RHAT_LIMIT
        if high.any():
            lines.append(f"warning: R-hat above {RHAT_LIMIT} for {worst('r_hat', high, False)}: "
                         "the chains disagree; run longer (more --warmup and --samples).")
        for column, kind in (("ess_bulk", "bulk"), ("ess_tail", "tail")):
            low = table[column] < ESS_PER_CHAIN * chains
            if low.any():
                lines.append(f"warning: {kind} ESS below {ESS_PER_CHAIN * chains} "
                             f"({ESS_PER_CHAIN} per chain) for {worst(column, low, True)}: "
                             "too few effective draws for stable "
                             + ("means" if kind == "bulk" else "intervals") + "; run longer.")
    if "sample_stats" in idata.groups() and "diverging" in idata.sample_stats:
        diverging = idata.sample_stats["diverging"].values
        count, total = int(diverging.sum()), diverging.size
        failures = int(idata.sample_stats["solver_failures"].values.sum()) \
            if "solver_failures" in idata.sample_stats else 0
        lines.append(f"{count} of {total} transitions diverged ({100 * count / total:.1f} %), "
                     f"{failures} solver failures rejected")
        if count:
            lines.append("warning: divergent transitions: the sampler could not follow the "
                         "posterior's curvature there, so the draws may be biased; raise "
                         "--target-accept or try the other parameterisation (--centered or "
                         "--non-centered).")
    return lines


def trust_line(attrs) -> str:
    """Pareto k-hat of an approximate posterior, whether its draws were resampled, and the
    verdict (what it means and what to run instead)."""
    from bayescal.inference.importance import verdict  # torch and pyro only when needed

    k = float(attrs["pareto_k"])
    resampled = ("stored draws resampled with the importance weights"
                 if int(attrs.get("importance_resampled", 0)) else "stored draws not resampled")
    ess = attrs.get("importance_ess")
    ess = f", importance ESS {float(ess):.0f}" if ess is not None else ""
    return f"Pareto k-hat {k:.2f} ({resampled}{ess}): {verdict(k, attrs.get('guide', ''))}"


def format_summary(idata: az.InferenceData, population_only: bool = False) -> str:
    """The summary table with a header naming the run, and diagnostics for samplers."""
    attrs = idata.posterior.attrs
    head = (f"method {attrs.get('method', '?')}"
            + (f" (guide {attrs['guide']})" if attrs.get("guide") else "")
            + f", model {attrs.get('model', '?')}, {idata.posterior.sizes['chain']} chain(s) x "
            f"{idata.posterior.sizes['draw']} draws, "
            + (f"after {attrs['warmup']} warm-up" if "warmup" in attrs
               else f"{attrs.get('steps', '?')} steps")
            + f", seed {attrs.get('seed', '?')}")
    lines = [head]
    if attrs.get("parameterisation") and (attrs.get("method") == "nuts"
                                          or attrs.get("centered")):
        lines.append(f"specimen level: {attrs['parameterisation']}"
                     + (f" (specimen sd / population scale: {attrs['specimen_sd_ratios']})"
                        if attrs.get("specimen_sd_ratios") else ""))
    table = summary_table(idata, population_only)
    with pd.option_context("display.max_rows", None, "display.width", 120):
        lines = [*lines, table.to_string(), *diagnostics(idata, table)]
    if "pareto_k" in attrs:
        lines.append(trust_line(attrs))
        if attrs.get("centered"):
            from bayescal.inference.importance import centered_caution

            lines.append(centered_caution(attrs.get("method", "?"),
                                          str(attrs["centered"]).split(",")))
    return "\n".join(lines)
