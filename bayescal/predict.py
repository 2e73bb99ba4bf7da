"""Uncertainty propagation: posterior draws pushed through new load paths.

Two kinds of prediction, both with measurement noise unless asked otherwise:

* **population** (default): every draw is a *new specimen* from that draw's population
  (``z = z_pop + tau * N(0, 1)`` per varying parameter, in the model's bounded space), put
  through every load path: the band a new test of this material should fall in;
* **fitted**: the fitted specimens' own parameter draws, each on its own path (or on one
  shared path): their bands on new loads.

New specimens come from the population's latent location and scale stored with the
posterior (``P_pop_loc``, ``P_pop_scale``), so that a posterior from any method (map, svi,
nuts) works. Draws and paths share one
batched solve (split into pieces of at most ``max_batch`` paths), never one solve per draw,
and Newton starts every draw from the trajectory at the draws' median parameters
(:func:`centre_trajectory`).
"""

from __future__ import annotations

import hashlib
import math
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from bayescal.arviz_import import az

from bayescal.card import ModelSpec, load_card, load_model, parse_card
from bayescal.data import Experiments, write_table
from bayescal.distributed import Communicator
from bayescal.errors import BadInput, InvalidSetting
from bayescal.export import POPULATION_SUFFIXES, population_names
from bayescal.hierarchy import Bounded
from bayescal.integrate import (MAX_BATCH, Grid, SolverOptions, fixed_substeps, plan_substeps,
                                refine, solve_recorded)

BAND = (0.05, 0.5, 0.95)


@dataclass(frozen=True)
class Prediction:
    """Stress ``(draw, path, step)`` (NaN where padded or where a draw's solve failed) for the
    paths of ``load``, with the parameters that made it (``(draw,)`` for new specimens,
    ``(draw, path)`` for fitted ones)."""

    load: Experiments
    stress: torch.Tensor
    parameters: dict[str, torch.Tensor]
    fitted: bool
    noise: bool
    failed_draws: int
    notes: tuple[str, ...]

    def bands(self) -> dict[str, np.ndarray]:
        """Mean and the 5/50/95 % quantiles over the draws that solved, ``(path, step)``."""
        stress = self.stress.numpy()
        good = stress[~np.isnan(stress[:, self.load.mask.T.numpy()]).any(-1)]
        q = np.quantile(good, BAND, axis=0) if len(good) else np.full((3,) + stress.shape[1:],
                                                                       np.nan)
        return {"mean": good.mean(0), "q05": q[0], "q50": q[1], "q95": q[2]}


def card_of(idata: az.InferenceData, card: str | Path | None = None) -> ModelSpec:
    """The model card of a fit: ``card`` if given, else the card text stored with the fit.

    A stored card is validated like any card file. A stored NEML2 card names its input file
    relative to the card's recorded folder; it is used only when a regular file there has
    the content recorded at the fit (``card_file_sha256``), checked before anything else
    looks at it, so that a crafted posterior cannot make bayescal open, or tell whether
    there is, a file of its choosing.
    """
    if card is not None:
        return load_card(card)
    attrs = idata.posterior.attrs
    text = str(attrs.get("card_toml", ""))
    path = str(attrs.get("card", "card.toml"))
    if not text:
        raise BadInput("the posterior does not hold its model card (fitted by an older "
                       "bayescal?): give it with --card")
    file = _input_file_of(text)
    if file is not None and not _unchanged(Path(path).parent / file,
                                           str(attrs.get("card_file_sha256", ""))):
        raise BadInput(f"the NEML2 input file of the posterior's card {path} is missing or has "
                       "changed since the fit: give the card with --card")
    return parse_card(text, path)


#: Largest NEML2 input file compared with its recorded hash (bytes).
_MAX_INPUT_FILE = 64 << 20


def _input_file_of(text: str) -> str | None:
    """``[model] file`` of card text (valid TOML or not; None when absent)."""
    try:
        model = tomllib.loads(text).get("model", {})
    except tomllib.TOMLDecodeError:
        return None
    file = model.get("file") if isinstance(model, dict) else None
    return str(file) if file is not None else None


def _unchanged(path: Path, sha256: str) -> bool:
    """Whether ``path`` is a regular file (of sensible size) whose content has ``sha256``."""
    try:
        info = path.stat()
        return (bool(sha256) and stat.S_ISREG(info.st_mode) and info.st_size <= _MAX_INPUT_FILE
                and hashlib.sha256(path.read_bytes()).hexdigest() == sha256)
    except (OSError, ValueError):
        return False


def check_posterior(idata: az.InferenceData, spec: ModelSpec, where: str) -> None:
    """A :class:`BadInput` naming ``where`` unless the posterior holds exactly the card's
    calibrated parameters, with the card's dimensions, finite and inside the card's bounds
    (population sd from 0 to the width of the bounds, noise sd positive)."""
    post = idata.posterior
    sampled = ("chain", "draw")
    expected = {"noise_sd": sampled}
    for name in spec.calibrated:
        if spec.parameters[name].varies == "shared":
            expected[name] = sampled
        else:
            expected.update({name: sampled + ("specimen",),
                             **{pop: sampled for pop in population_names(name)}})
    present = set(post.data_vars)
    older = [name for name in spec.varying
             if f"{name}_pop_mean" in present and f"{name}_pop_loc" not in present]
    if older:
        raise BadInput(f"{where}: the posterior lacks the population's latent location and "
                       f"scale ({older[0]}_pop_loc, {older[0]}_pop_scale): it was written by an "
                       "older bayescal; fit again")
    if present != set(expected):
        missing, extra = sorted(set(expected) - present), sorted(present - set(expected))
        detail = "; ".join(part for part in (
            f"the card's {', '.join(missing)} not in the posterior" if missing else "",
            f"the posterior's {', '.join(extra)} not calibrated by the card" if extra else "")
            if part)
        raise BadInput(f"{where}: the card {spec.path} ({spec.model}) does not match the "
                       f"posterior: {detail}")
    for name, dims in expected.items():
        if post[name].dims != dims:
            raise BadInput(f"{where}: posterior variable {name} has dimensions "
                           f"{post[name].dims}, expected {dims}")
        values = np.asarray(post[name].values, dtype=float)
        base = name
        for suffix in POPULATION_SUFFIXES:
            base = base.removesuffix(suffix)
        if name == "noise_sd":
            low, high, what = 0.0, math.inf, "positive"
        elif name.endswith("_pop_loc"):
            low, high, what = -math.inf, math.inf, ""
        elif name.endswith("_pop_scale"):
            low, high, what = 0.0, math.inf, "non-negative"
        elif name.endswith("_pop_sd"):
            lo, hi = spec.parameters[base].bounds
            low, high, what = 0.0, hi - lo, f"between 0 and {hi - lo:g}"
        else:
            low, high = spec.parameters[base].bounds
            what = f"inside the bounds [{low:g}, {high:g}]"
        strict = name == "noise_sd"
        bad = ~np.isfinite(values) | (values < low) | (values > high) | (strict & (values <= low))
        if bad.any():
            raise BadInput(f"{where}: posterior variable {name} has a value "
                           f"{float(values[bad].flat[0])!r} that is not a finite number {what}")


def load_for_prediction(posterior: str | Path, card: str | Path | None = None
                        ) -> tuple[az.InferenceData, ModelSpec]:
    """A fit's ``posterior.nc`` and its card (``card``, else the stored one), checked to
    belong together (:func:`check_posterior`)."""
    from bayescal.summary import load_posterior

    idata = load_posterior(posterior)
    spec = card_of(idata, card)
    check_posterior(idata, spec, f"--card {card}" if card is not None else str(posterior))
    return idata, spec


def _stacked(idata: az.InferenceData, name: str) -> torch.Tensor:
    """A posterior variable with (chain, draw) flattened to one leading dimension."""
    value = idata.posterior[name].values
    return torch.as_tensor(value.reshape(-1, *value.shape[2:]), dtype=torch.float64)


def _is_point(idata: az.InferenceData) -> bool:
    post = idata.posterior
    return idata.posterior.attrs.get("method") == "map" or all(
        bool(np.all(post[v].values == post[v].values.reshape(-1, *post[v].shape[2:])[0]))
        for v in post.data_vars)


def new_specimens(spec: ModelSpec, idata: az.InferenceData, index: torch.Tensor,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Physical parameters ``(draw,)`` of one new specimen per chosen posterior draw."""
    values = {}
    for name, p in spec.parameters.items():
        if p.is_fixed:
            values[name] = torch.full(index.shape, p.value, dtype=torch.float64)
        elif p.varies == "shared":
            values[name] = _stacked(idata, name)[index]
        else:
            t = Bounded(*p.bounds)
            z_pop = _stacked(idata, f"{name}_pop_loc")[index]
            tau = _stacked(idata, f"{name}_pop_scale")[index]
            eps = torch.randn(index.shape, generator=generator, dtype=torch.float64)
            values[name] = t.forward(z_pop + tau * eps)
    return values


def fitted_specimens(spec: ModelSpec, idata: az.InferenceData, index: torch.Tensor,
                     paths: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Physical parameters ``(draw, path)`` of the fitted specimens named by the paths."""
    fitted = [str(s) for s in idata.posterior["specimen"].values]
    missing = [p for p in paths if p not in fitted]
    if missing:
        raise InvalidSetting("fitted", f": load path(s) {', '.join(missing)} name no fitted "
                             f"specimen (fitted: {', '.join(fitted)}); key the paths by fitted "
                             "specimen ids or give one path without a specimen column")
    columns = torch.tensor([fitted.index(p) for p in paths])
    values = {}
    for name, p in spec.parameters.items():
        if p.is_fixed:
            values[name] = torch.full((len(index), len(paths)), p.value, dtype=torch.float64)
        elif p.varies == "shared":
            values[name] = _stacked(idata, name)[index][:, None].expand(-1, len(paths))
        else:
            values[name] = _stacked(idata, name)[index][:, columns]
    return values


#: Draws that the integration grid of a prediction is planned over.
PLAN_DRAWS = 32


def prediction_substeps(model, options: SolverOptions, parameters: dict[str, torch.Tensor],
                        load: Experiments) -> torch.Tensor:
    """Integration steps per recorded interval of ``load`` for every draw: the card's fixed
    counts, or planned from its tolerance over the first :data:`PLAN_DRAWS` draws
    (``parameters`` ``(draw, path)``; the draws are random, so these are a random subset)
    rather than over all of them, which would cost several solves of every draw."""
    if not options.automatic:
        return fixed_substeps(load.time, load.strain, options)
    d = min(PLAN_DRAWS, next(iter(parameters.values())).shape[0])
    sub = {k: v[:d].reshape(-1) for k, v in parameters.items()}
    temperature = None if load.temperature is None else load.temperature.repeat(1, d)
    return plan_substeps(model, sub, load.time.repeat(1, d), load.strain.repeat(1, d), options,
                         temperature, load.mask.repeat(1, d)).substeps


def centre_trajectory(model, options: SolverOptions, parameters: dict[str, torch.Tensor],
                      grid: Grid) -> torch.Tensor | None:
    """The trajectory of every path of ``grid`` at the draws' median parameters
    (``parameters`` ``(draw, path)``), where Newton starts each draw's solve (moved to its
    state chunk by chunk, :class:`~bayescal.integrate.ShiftedTrajectoryPredictor`), as a
    fit's draws do (:func:`bayescal.inference.draws.posterior_draws`); None if it failed.
    Measured (one-off script, both ways in one process, twice): 500 draws of the 304L set's
    64 fitted specimens on their own paths 108.7-118.3 s against 137.3-137.5 s from the step
    predictor; 500 new specimens on 4 paths 1.86-2.03 s against 2.00-2.03 s; the stress the
    same to 8e-8 MPa."""
    middle = {k: v.median(dim=0).values for k, v in parameters.items()}
    _, states, report = solve_recorded(model, middle, grid, options, adjoint=False)
    return None if report.n_failed else states


def propagate(spec: ModelSpec, parameters: dict[str, torch.Tensor], load: Experiments,
              max_batch: int = MAX_BATCH, progress: bool = False,
              comm: Communicator | None = None) -> tuple[torch.Tensor, int]:
    """Noise-free stress ``(draw, path, step)`` for parameters broadcastable to
    ``(draw, path)``, in batched solves; returns it with the number of failed draws.

    On several ranks (``comm``) each solves a share of the draws (a draw's paths all have
    the same length, so draws are split evenly), and the stress is gathered on every rank;
    the grid is planned on every rank alike (:func:`prediction_substeps`)."""
    from tqdm.auto import tqdm

    model = load_model(spec)
    n_paths = load.n_specimens
    n = max(v.shape[0] for v in parameters.values())
    full = {k: v.reshape(v.shape[0], -1).expand(n, n_paths) for k, v in parameters.items()}
    per_piece = max(1, max_batch // n_paths)
    substeps = prediction_substeps(model, spec.solver, full, load)
    shard = None if comm is None else comm.shard([1.0] * n)
    mine = {k: v if shard is None else v[shard.index] for k, v in full.items()}
    n_mine = next(iter(mine.values())).shape[0]
    grid = refine(load.time, load.strain, substeps, load.temperature)  # one draw's paths
    centre = centre_trajectory(model, spec.solver, full, grid)
    pieces = []
    for start in tqdm(range(0, n_mine, per_piece), disable=not progress, desc="predict",
                      unit="batch"):
        d = min(per_piece, n_mine - start)
        params = {k: v[start:start + d].reshape(-1) for k, v in mine.items()}
        at_points, _, _ = solve_recorded(model, params, grid.repeat(d), spec.solver,
                                         adjoint=False,
                                         guess=None if centre is None else centre.repeat(1, d, 1))
        pieces.append(model.stress(at_points).T.reshape(d, n_paths, -1))
    stress = torch.cat(pieces)
    if shard is not None:
        stress = shard.gather(stress, dim=0)
    failed = int(torch.isnan(stress).flatten(1).any(-1).sum())
    return torch.where(load.mask.T, stress, torch.nan), failed


def predict(idata: az.InferenceData, load: Experiments, draws: int = 500, fitted: bool = False,
            seed: int = 0, noise: bool = True, spec: ModelSpec | None = None,
            max_batch: int = MAX_BATCH, progress: bool = False,
            comm: Communicator | None = None) -> Prediction:
    """Push ``draws`` posterior draws of ``idata`` through the paths of ``load``; on
    several ranks (``comm``), each solving a share of the draws, with the same result on
    every rank (every rank draws the same random numbers)."""
    if draws < 1:
        raise InvalidSetting("draws", f"must be at least 1, got {draws}")
    if comm is not None and comm.world > draws:
        raise InvalidSetting("workers", f"{comm.world}: more workers than draws ({draws}); "
                             "each worker needs at least one draw")
    progress = progress and (comm is None or comm.writer)
    spec = spec or card_of(idata)
    generator = torch.Generator().manual_seed(seed)
    available = idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"]
    if draws <= available:
        index = torch.randperm(available, generator=generator)[:draws]
    else:
        index = torch.randint(available, (draws,), generator=generator)
    notes = []
    if _is_point(idata):
        notes.append("the posterior is a single point (MAP): the bands hold no parameter "
                     "uncertainty, only measurement noise"
                     + ("" if fitted else " and the specimen-to-specimen spread"))
    if fitted:
        parameters = fitted_specimens(spec, idata, index, load.specimens)
    else:
        parameters = new_specimens(spec, idata, index, generator)
    stress, failed = propagate(spec, parameters, load, max_batch, progress, comm)
    if noise:
        sd = _stacked(idata, "noise_sd")[index]
        eps = torch.randn(stress.shape, generator=generator, dtype=torch.float64)
        stress = stress + sd[:, None, None] * eps
    if failed:
        notes.append(f"the solver failed for {failed} of {draws} draws; the bands use the "
                     f"others")
    return Prediction(load=load, stress=stress, parameters=parameters, fitted=fitted,
                      noise=noise, failed_draws=failed, notes=tuple(notes))


def to_inference_data(prediction: Prediction, attrs: dict) -> az.InferenceData:
    """``predictions`` (``stress`` with dims chain, draw, specimen, step, and the parameters)
    and ``predictions_constant_data`` (``time``, ``strain``)."""
    load = prediction.load
    coords = {"chain": [0], "draw": np.arange(prediction.stress.shape[0]),
              "specimen": list(load.specimens), "step": np.arange(load.n_steps)}
    variables = {"stress": (("chain", "draw", "specimen", "step"), prediction.stress.numpy()[None])}
    for name, value in prediction.parameters.items():
        dims = ("chain", "draw", "specimen")[:value.dim() + 1]
        variables[name] = (dims, value.numpy()[None])
    mask = load.mask.T.numpy()
    constant = {k: (("specimen", "step"), np.where(mask, getattr(load, k).T.numpy(), np.nan))
                for k in ("time", "strain")}
    predictions = xr.Dataset(variables, coords=coords)
    predictions.attrs.update({k: ("" if v is None else v) for k, v in attrs.items()})
    return az.InferenceData(
        predictions=predictions,
        predictions_constant_data=xr.Dataset(constant, coords={k: coords[k] for k in
                                                               ("specimen", "step")}))


def write_bands(prediction: Prediction, path: Path) -> None:
    """``specimen, step, time, strain, mean, q05, q50, q95`` at every recorded point."""
    load, bands = prediction.load, prediction.bands()
    mask = load.mask.T.numpy()
    time, strain = load.time.T.numpy(), load.strain.T.numpy()

    def rows():
        for j, sid in enumerate(load.specimens):
            for k in np.flatnonzero(mask[j]):
                yield [sid, int(k), time[j, k], strain[j, k],
                       *(bands[c][j, k] for c in ("mean", "q05", "q50", "q95"))]

    write_table(path, ["specimen", "step", "time", "strain", "mean", "q05", "q50", "q95"],
                rows())


def predict_to_directory(idata: az.InferenceData, load: Experiments, out: Path, *,
                         attrs: dict, figures: bool = True, **kwargs) -> Prediction:
    """:func:`predict`, then write ``predictions.nc``, ``bands.csv`` and ``bands.png`` into
    ``out`` (each atomically; no file is written if the prediction fails), holding the
    folder's lock (:class:`~bayescal.output.FolderLock`) throughout. On several ranks
    (``comm``) only rank 0 holds the lock and writes."""
    from bayescal.export import write_netcdf
    from bayescal.output import FolderLock

    out = Path(out)
    comm = kwargs.get("comm")
    if comm is not None and not comm.writer:
        return predict(idata, load, **kwargs)
    with FolderLock(out):
        prediction = predict(idata, load, **kwargs)
        meta = {**attrs, "kind": "fitted" if prediction.fitted else "population",
                "noise": int(prediction.noise), "failed_draws": prediction.failed_draws,
                "notes": " ".join(prediction.notes)}
        write_netcdf(to_inference_data(prediction, meta), out / "predictions.nc")
        write_bands(prediction, out / "bands.csv")
        if figures:
            from bayescal.plots import plot_prediction

            plot_prediction(prediction, out / "bands.png")
    return prediction
