"""Figures: fit and prediction bands per specimen, ELBO trace, prior vs posterior.

Plots read only the InferenceData (and the card for priors); they know no solver internals.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bayescal.card import ModelSpec  # noqa: E402
from bayescal.hierarchy import Bounded  # noqa: E402

BAND = (0.05, 0.95)
MAX_PANELS = 24


def _grid(n: int, width: float = 3.2, height: float = 2.6):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False,
                             sharex=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def band_panels(names, strain: np.ndarray, lo: np.ndarray, mid: np.ndarray, hi: np.ndarray,
                observed: np.ndarray | None, path: Path, title: str) -> None:
    """One panel per specimen (or path), arrays ``(specimen, step)`` with NaN where padded:
    the 90% band and median against strain, with the measured stress as dots if given."""
    shown = list(names)[:MAX_PANELS]
    fig, axes = _grid(len(shown))
    for i, (ax, name) in enumerate(zip(axes, shown)):
        keep = np.isfinite(strain[i])
        ax.fill_between(strain[i][keep], lo[i][keep], hi[i][keep], color="C0", alpha=0.3,
                        lw=0, label="90% band")
        ax.plot(strain[i][keep], mid[i][keep], color="C0", lw=1, label="median")
        if observed is not None:
            ax.plot(strain[i][keep], observed[i][keep], ".", color="k", ms=2.5, label="data")
        ax.set_title(str(name), fontsize=9)
        ax.set_xlabel("strain")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("stress (MPa)")
    axes[0].legend(fontsize=7, loc="lower right")
    extra = f" (first {MAX_PANELS} of {len(names)})" if len(names) > MAX_PANELS else ""
    fig.suptitle(title + extra)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bands(idata, path: Path, title: str = "Data and posterior-predictive 90% band") -> None:
    """A fit's posterior-predictive bands over its data, one panel per specimen."""
    pred = idata.posterior_predictive["stress"]
    lo, mid, hi = (pred.quantile(q, dim=("chain", "draw")).values for q in (BAND[0], 0.5, BAND[1]))
    band_panels(list(pred["specimen"].values), idata.constant_data["strain"].values, lo, mid, hi,
                idata.observed_data["stress"].values, path, title)


MAX_GROUPS = 12


def plot_bands_by_label(idata, label: str, path: Path) -> None:
    """One panel per value of a numeric label (e.g. ``strain_rate``): every specimen with that
    value, its data as dots and its posterior-predictive median as a line, over the union of
    their 90% bands."""
    pred = idata.posterior_predictive["stress"]
    lo, mid, hi = (pred.quantile(q, dim=("chain", "draw")).values for q in (BAND[0], 0.5, BAND[1]))
    strain = idata.constant_data["strain"].values
    observed = idata.observed_data["stress"].values
    values = idata.constant_data[label].values
    groups = np.unique(values)
    fig, axes = _grid(len(groups), width=3.6, height=3.0)
    for ax, value in zip(axes, groups):
        members = np.flatnonzero(values == value)
        for colour, i in enumerate(members):
            keep = np.isfinite(strain[i])
            ax.fill_between(strain[i][keep], lo[i][keep], hi[i][keep], color="C0", alpha=0.12,
                            lw=0)
            ax.plot(strain[i][keep], observed[i][keep], ".", color="0.3", ms=1.5)
            ax.plot(strain[i][keep], mid[i][keep], color=f"C{colour % 10}", lw=0.8)
        ax.set_title(f"{label} = {value:g} ({len(members)} specimens)", fontsize=9)
        ax.set_xlabel("strain")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("stress (MPa)")
    fig.suptitle(f"Data (dots), posterior-predictive medians (lines) and 90% bands by {label}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_prediction(prediction, path: Path) -> None:
    """The bands of a :class:`~bayescal.predict.Prediction`, one panel per load path."""
    bands = prediction.bands()
    load = prediction.load
    strain = np.where(load.mask.T.numpy(), load.strain.T.numpy(), np.nan)
    kind = "fitted specimens" if prediction.fitted else "new specimens from the population"
    noise = "with" if prediction.noise else "without"
    band_panels(load.specimens, strain, bands["q05"], bands["q50"], bands["q95"], None, path,
                f"Predicted stress, {kind}: 90% band ({noise} measurement noise)")


def plot_elbo(idata, path: Path) -> None:
    """The MAP stage's log joint, then the SVI stage's ELBO, against evaluation."""
    attrs = idata.posterior.attrs
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    offset = 0
    for key, label in (("log_joint_map", "MAP (Newton): log joint"),
                       ("elbo", f"SVI ({attrs.get('guide')} guide): ELBO")):
        values = np.atleast_1d(np.asarray(attrs.get(key, []), dtype=float))
        if values.size:
            ax.plot(offset + np.arange(values.size), values, lw=1, label=label)
            offset += values.size
    ax.set_yscale("symlog", linthresh=1e3)
    ax.set_xlabel("evaluation")
    ax.set_ylabel("log joint / ELBO")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _prior_samples(spec: ModelSpec, name: str, n: int = 20000) -> np.ndarray:
    """Physical values implied by the card's prior for a population mean or shared value."""
    p = spec.parameters[name]
    t = Bounded(*p.bounds)
    z0 = t.inverse(p.prior[0])
    z = z0 + p.prior[1] / t.slope(z0) * torch.randn(n, generator=torch.Generator().manual_seed(0),
                                                      dtype=torch.float64)
    return t.forward(z).numpy()


def _prior_posterior(ax, prior: np.ndarray, posterior: np.ndarray, title: str) -> None:
    """Posterior histogram with the prior density as a line on its own scale (a posterior is
    often far narrower than its prior), annotated with both means and sds."""
    lo, hi = np.quantile(np.concatenate([prior, posterior]), [0.005, 0.995])
    bins = np.linspace(lo, hi, 80)
    ax.hist(posterior, bins=bins, density=True, color="C1", alpha=0.85, label="posterior")
    twin = ax.twinx()
    density, edges = np.histogram(prior, bins=bins, density=True)
    twin.plot(0.5 * (edges[1:] + edges[:-1]), density, color="0.35", lw=1.2, label="prior")
    for a in (ax, twin):
        a.set_yticks([])
    twin.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.text(0.02, 0.97, f"post {posterior.mean():.4g} ± {posterior.std():.2g}\n"
            f"prior {prior.mean():.4g} ± {prior.std():.2g}", transform=ax.transAxes,
            va="top", fontsize=7)
    ax.figure.legend(handles=[ax.patches[0], twin.lines[0]], labels=["posterior", "prior"],
                     loc="upper right", fontsize=7) if ax is ax.figure.axes[0] else None


def plot_population(idata, spec: ModelSpec, path: Path) -> None:
    """Prior vs posterior of each population mean (varying), value (shared) and the noise."""
    post = idata.posterior
    panels = [(f"{n}_pop_mean" if p.varies == "specimen" else n, n)
              for n, p in spec.parameters.items() if not p.is_fixed]
    fig, axes = _grid(len(panels) + 1, width=3.4, height=2.6)
    for ax, (var, name) in zip(axes, panels):
        _prior_posterior(ax, _prior_samples(spec, name), post[var].values.ravel(), var)
    sd = spec.noise_prior_scale
    prior_noise = np.abs(np.random.default_rng(0).normal(0.0, sd, 20000))
    _prior_posterior(axes[len(panels)], prior_noise, post["noise_sd"].values.ravel(),
                     "noise_sd (MPa)")
    fig.suptitle("Population: prior (line) vs posterior (histogram)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_fit_figures(idata, spec: ModelSpec, out: Path) -> list[Path]:
    """The figures of a fit: ``fit_bands.png``, ``elbo.png``, ``population.png`` and, for
    each numeric label with 2 to 12 values, ``fit_bands_by_<label>.png``."""
    out = Path(out)
    paths = [out / "fit_bands.png", out / "elbo.png", out / "population.png"]
    plot_bands(idata, paths[0])
    plot_elbo(idata, paths[1])
    plot_population(idata, spec, paths[2])
    for label in idata.constant_data.data_vars:
        data = idata.constant_data[label]
        if data.dims == ("specimen",) and 1 < len(np.unique(data.values)) <= MAX_GROUPS:
            paths.append(out / f"fit_bands_by_{label}.png")
            plot_bands_by_label(idata, label, paths[-1])
    return paths
