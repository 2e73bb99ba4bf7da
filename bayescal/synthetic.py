"""Synthetic data for ``bayescal simulate``: specimens drawn from a card's prior population,
simulated on a load path, with optional measurement noise; written atomically."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bayescal.card import ModelSpec, load_model
from bayescal.data import (Experiments, has_specimen_column, read_load_path, write_experiments,
                           write_table)
from bayescal.errors import BadInput
from bayescal.hierarchy import SolverFailure, draw_specimens
from bayescal.integrate import simulate
from bayescal.output import prepare_output_file


@dataclass(frozen=True)
class Synthetic:
    """Synthetic data and the physical parameters of its specimens (``(specimen,)`` each,
    in the model's parameter order)."""

    experiments: Experiments
    parameters: dict[str, torch.Tensor]


def specimen_ids(n: int) -> tuple[str, ...]:
    """``S001``, ``S002``, ... for ``n`` specimens."""
    return tuple(f"S{i:03d}" for i in range(1, n + 1))


def read_simulation_load(path: str | os.PathLike, n_specimens: int | None = None) -> Experiments:
    """The load path of ``bayescal simulate``: one path per id of a ``specimen`` column (then
    ``n_specimens`` must be None or the number of ids), else the single path replicated for
    ``n_specimens`` (default 1) specimens ``S001``, ``S002``, ..."""
    if n_specimens is not None and n_specimens < 1:
        raise BadInput("the number of specimens (--specimens) must be at least 1, "
                       f"got {n_specimens}")
    load = read_load_path(path)
    if has_specimen_column(path):
        if n_specimens is not None and n_specimens != load.n_specimens:
            raise BadInput(f"{path}: has {load.n_specimens} specimen ids but {n_specimens} "
                           f"specimens were asked for (--specimens): omit it or give "
                           f"{load.n_specimens}")
        return load
    return read_load_path(path, specimens=specimen_ids(n_specimens or 1))


def _noise_generator(seed: int) -> torch.Generator:
    """A generator for measurement noise, independent of the stream of :func:`draw_specimens`."""
    state = np.random.SeedSequence([seed, 1]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def simulate_experiments(spec: ModelSpec, load: Experiments, seed: int = 0,
                         noise_sd: float = 0.0, device: str | torch.device = "cpu") -> Synthetic:
    """Draw one specimen per path of ``load`` from the card's prior population
    (:func:`~bayescal.hierarchy.draw_specimens`), simulate its stress at the recorded points,
    and add Gaussian noise of sd ``noise_sd`` MPa. Seeded: the same seed gives the same data.
    Raises :class:`~bayescal.hierarchy.SolverFailure` if a specimen cannot be integrated."""
    if not (noise_sd >= 0 and math.isfinite(noise_sd)):
        raise BadInput(f"the noise sd (--noise) must be a non-negative finite number, got "
                       f"{noise_sd:g}")
    model = load_model(spec)
    n = load.n_specimens
    params = draw_specimens(spec, n, seed)
    device = torch.device(device)
    stress, report = simulate(
        model, {k: v.to(device) for k, v in params.items()},
        load.time.to(device, torch.float64), load.strain.to(device, torch.float64),
        spec.solver, adjoint=False,
        temperature=None if load.temperature is None else load.temperature.to(device,
                                                                             torch.float64))
    if report.n_failed:
        raise SolverFailure(report)
    stress = stress.cpu()
    if noise_sd > 0:
        noise = torch.randn(stress.shape, generator=_noise_generator(seed), dtype=stress.dtype)
        stress = stress + noise_sd * noise
    stress = torch.where(load.mask, stress, torch.nan)
    return Synthetic(replace(load, stress=stress), {k: params[k] for k in model.parameters})


def write_parameters(synthetic: Synthetic, path: str | os.PathLike) -> None:
    """Write the specimens' parameters as CSV (``specimen`` then every model parameter),
    atomically (a temporary file renamed over ``path``)."""
    names = list(synthetic.parameters)
    columns = [synthetic.parameters[k].tolist() for k in names]
    rows = [[sid, *(repr(float(c[j])) for c in columns)]
            for j, sid in enumerate(synthetic.experiments.specimens)]
    write_table(Path(path), ["specimen", *names], rows)


def parameters_path(out: str | os.PathLike) -> Path:
    """Where the parameters of synthetic data ``out`` go: ``<out stem>.params.csv`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.params.csv")


def output_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """The data file ``out`` (checked by :func:`~bayescal.output.prepare_output_file`) and its
    parameters file."""
    out = prepare_output_file(out, "the data CSV")
    return out, parameters_path(out)


def write_synthetic(synthetic: Synthetic, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the data CSV and its parameters file, each atomically; returns both paths."""
    out, params = output_paths(out)
    write_experiments(synthetic.experiments, out)
    write_parameters(synthetic, params)
    return out, params
