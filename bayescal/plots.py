"""Figures: the raw data, fit and prediction bands per specimen, ELBO trace, prior vs posterior.

Plots read only the InferenceData (and the card for priors); they know no solver internals.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib.backend_bases
from matplotlib.figure import Figure
import numpy as np
import torch

from bayescal.card import ModelSpec
from bayescal.errors import BadInput, InvalidSetting
from bayescal.hierarchy import Bounded
from bayescal.output import prepare_output_file, write_atomically

BAND = (0.05, 0.95)
MAX_PANELS = 24


def _grid(n: int, width: float = 3.2, height: float = 2.6):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=False, sharey=True)
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
    save_figure(fig, path, dpi=110)


def band_quantiles(pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lower band edge, median and upper band edge over a predictive's draws, per
    specimen and point. A shorter specimen's padded points are NaN in every draw: their
    quantiles are NaN, without numpy's "All-NaN slice" warning (a failed draw, NaN at some
    points, is still skipped)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All-NaN slice", category=RuntimeWarning)
        return tuple(pred.quantile(q, dim=("chain", "draw")).values
                     for q in (BAND[0], 0.5, BAND[1]))


def plot_bands(idata, path: Path, title: str = "Data and posterior-predictive 90% band") -> None:
    """A fit's posterior-predictive bands over its data, one panel per specimen."""
    pred = idata.posterior_predictive["stress"]
    lo, mid, hi = band_quantiles(pred)
    band_panels(list(pred["specimen"].values), idata.constant_data["strain"].values, lo, mid, hi,
                idata.observed_data["stress"].values, path, title)


MAX_GROUPS = 12


def plot_bands_by_label(idata, label: str, path: Path) -> None:
    """One panel per value of a numeric label (e.g. ``strain_rate``): every specimen with that
    value, its data as dots and its posterior-predictive median as a line, over the union of
    their 90% bands."""
    pred = idata.posterior_predictive["stress"]
    lo, mid, hi = band_quantiles(pred)
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
    save_figure(fig, path, dpi=110)


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
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
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
    if offset:  # a sampler's run has no optimisation history to show
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


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
    save_figure(fig, path, dpi=110)


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


# ------------------------------------------------------------------------- raw data figure

#: At most this many specimens get a legend of their ids.
MAX_LEGEND = 10
AXES = {"strain": "strain", "time": "time since the specimen's first point (s)"}


def _numeric(values: tuple) -> bool:
    return all(isinstance(v, float) for v in values)


def _varying_numeric_labels(experiments) -> list[str]:
    return [name for name, values in experiments.labels.items()
            if _numeric(values) and len(set(values)) > 1]


def _check_label(experiments, label: str, option: str) -> tuple:
    """The values of ``label``, or an InvalidSetting naming the setting ``option`` and the
    labels there are."""
    if label not in experiments.labels:
        names = ", ".join(experiments.labels) or "none"
        raise InvalidSetting(option, f"{label}: {experiments.source} has no label {label!r} "
                       f"(labels: {names})")
    return experiments.labels[label]


def _colour_scale(values: np.ndarray):
    """The colour map and norm of a numeric label, and whether the scale is logarithmic.

    At most :data:`MAX_GROUPS` distinct values get one colour each, in order of value (the
    colour bar has one equal block per value: rates such as 1800 and 3600 /s stay apart
    beside 1e-4 /s); more values get a continuous scale. Either is logarithmic (block
    boundaries at geometric midpoints) when all values are positive and span more than a
    decade, else linear."""
    lo, hi = float(values.min()), float(values.max())
    log = lo > 0 and hi / lo > 10
    distinct = np.unique(values)
    if len(distinct) <= MAX_GROUPS:
        colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, len(distinct)))
        cmap = matplotlib.colors.ListedColormap(colours)
        if len(distinct) == 1:
            edges = [lo - 0.5, lo + 0.5]
        else:
            middle = np.sqrt(distinct[1:] * distinct[:-1]) if log else \
                0.5 * (distinct[1:] + distinct[:-1])
            first = distinct[0] ** 2 / middle[0] if log else 2 * distinct[0] - middle[0]
            last = distinct[-1] ** 2 / middle[-1] if log else 2 * distinct[-1] - middle[-1]
            edges = [first, *middle, last]
        return cmap, matplotlib.colors.BoundaryNorm(edges, len(distinct)), log
    cmap = matplotlib.colormaps["viridis"]
    if log:
        return cmap, matplotlib.colors.LogNorm(vmin=lo, vmax=hi), True
    return cmap, matplotlib.colors.Normalize(vmin=lo, vmax=hi), False


def _format_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plot_data(experiments, path: str | Path | None = None, by: str | None = None,
              x: str = "strain", colour: str | None = None):
    """A figure of measured stress histories before any fit: stress against strain (or time
    since each specimen's first point) for every specimen.

    Time is counted from each specimen's first point, on a log scale when the specimens'
    durations differ by more than a decade. Specimens are coloured by the numeric label ``colour`` (default: the first numeric label
    that varies between specimens, other than ``by``), on a logarithmic colour scale with a
    colour bar when its values span more than a decade; without such a label each specimen
    has its own colour. With ``by``, one panel per value of that label (2 to 12 values,
    numeric or text). The specimen ids are shown in a legend when there are at most
    :data:`MAX_LEGEND` specimens. Returns the figure (a :class:`matplotlib.figure.Figure`, no pyplot state); written
    atomically to ``path`` if given, in the format of its suffix.
    """
    if x not in AXES:
        raise InvalidSetting("x", f"{x}: must be one of {', '.join(AXES)}")
    if experiments.stress is None:
        raise BadInput(f"{experiments.source}: has no stress column (a load path, not data)")
    if path is not None:  # fail before the work
        path = Path(path)
        prepare_output_file(path, "the figure")
        _figure_format(path)
    groups: list = [None]
    if by is not None:
        values = _check_label(experiments, by, "by")
        distinct = sorted(set(values))
        if not 2 <= len(distinct) <= MAX_GROUPS:
            raise InvalidSetting("by", f"{by}: {experiments.source} has {len(distinct)} distinct "
                           f"value(s) of {by!r}; one panel per value needs 2 to {MAX_GROUPS}")
        groups = distinct
    if colour is not None:
        values = _check_label(experiments, colour, "colour")
        if not _numeric(values):
            shown = ", ".join(sorted(set(map(str, values)))[:5])
            raise InvalidSetting("colour", f"{colour}: label {colour!r} of {experiments.source} is "
                           f"not numeric (values: {shown}); colours need a numeric label")
    else:
        colour = next((name for name in _varying_numeric_labels(experiments) if name != by),
                      None)

    mask = experiments.mask.T.numpy()
    stress = experiments.stress.T.numpy()
    xs = experiments.strain.T.numpy() if x == "strain" else \
        (experiments.time - experiments.time[0]).T.numpy()
    n = experiments.n_specimens
    norm = log = None
    if colour is not None:
        cvalues = np.asarray(experiments.labels[colour], dtype=float)
        cmap, norm, log = _colour_scale(cvalues)
    # a time axis over tests whose durations differ by more than a decade is read on a log
    # scale (the first point of each specimen, at 0, is then left out)
    durations = xs.max(axis=1) if x == "time" else None
    log_x = durations is not None and durations.min() > 0 and \
        durations.max() / durations.min() > 10

    n_panels = len(groups)
    cols = n_panels if n_panels <= 4 else (3 if n_panels in (5, 6, 9) else 4)
    rows = math.ceil(n_panels / cols)
    width = 8.0 if n_panels == 1 else 3.6 * cols
    height = 5.0 if n_panels == 1 else 3.0 * rows
    fig = Figure(figsize=(width + (1.2 if colour else 0), height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True, sharex=x == "strain")
    axes = list(axes.flat)
    for ax in axes[n_panels:]:
        ax.remove()
    axes = axes[:n_panels]
    labels_by = experiments.labels[by] if by is not None else None
    for ax, group in zip(axes, groups):
        members = [j for j in range(n) if group is None or labels_by[j] == group]
        for k, j in enumerate(members):
            keep = mask[j] & (xs[j] > 0) if log_x else mask[j]
            line_colour = cmap(norm(cvalues[j])) if colour is not None else f"C{k % 10}"
            ax.plot(xs[j][keep], stress[j][keep], "-", color=line_colour, lw=0.9, alpha=0.85,
                    marker=".", ms=2.0, label=experiments.specimens[j])
        if by is not None:
            ax.set_title(f"{by} = {_format_value(group)} ({len(members)} specimen"
                         f"{'s' if len(members) != 1 else ''})", fontsize=9)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(AXES[x] + (", log scale" if log_x else ""), fontsize=9)
        ax.tick_params(labelbottom=True)  # also above an empty grid cell
        ax.grid(alpha=0.3)
        if n <= MAX_LEGEND:
            ax.legend(fontsize=7, loc="best")
    for i, ax in enumerate(axes):
        if i % cols == 0:
            ax.set_ylabel("stress (MPa)")
    if colour is not None:
        mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
        distinct = sorted(set(cvalues.tolist()))
        discrete = len(distinct) <= MAX_GROUPS
        bar = fig.colorbar(mappable, ax=axes, shrink=0.9 if n_panels > 1 else 1.0,
                           spacing="uniform" if discrete else "proportional")
        if discrete:  # one block per value, the tick in its middle
            edges = np.asarray(norm.boundaries)
            bar.set_ticks(0.5 * (edges[1:] + edges[:-1]), labels=[f"{v:g}" for v in distinct])
            bar.minorticks_off()
            bar.set_label(colour)
        else:
            bar.set_label(colour + (" (log scale)" if log else ""))
    against = "strain" if x == "strain" else "time"
    title = f"{Path(experiments.source).name}: stress against {against}, {n} specimen" \
            f"{'s' if n != 1 else ''}"
    if by is not None:
        title += f", by {by}"
    fig.suptitle(title)
    if path is not None:
        save_figure(fig, path)
    return fig


def _figure_format(path: Path) -> str:
    formats = matplotlib.backend_bases.FigureCanvasBase.get_supported_filetypes()
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in formats:
        what = f"unknown figure format {path.suffix!r}" if path.suffix else "no file suffix"
        raise InvalidSetting("out", f"{path}: {what} (use .png, .pdf or .svg)")
    return fmt


def save_figure(fig, path: str | Path, dpi: int = 130) -> Path:
    """Write ``fig`` atomically: a temporary file in the same folder renamed over ``path``, so
    that an earlier figure is never half-overwritten. The folder is created if missing; a
    folder that cannot be written is a :class:`~bayescal.errors.BadInput`."""
    path = Path(path)
    prepare_output_file(path, "the figure")
    fmt = _figure_format(path)
    return write_atomically(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))
