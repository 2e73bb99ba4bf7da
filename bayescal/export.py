"""ArviZ InferenceData in the layout of the output contract, written atomically to netCDF.

Groups: ``posterior`` (each calibrated ``P``; for varying ones ``P_pop_mean``/``P_pop_sd``,
the population's physical moments, and ``P_pop_loc``/``P_pop_scale``, its latent location and
scale, from which predict draws new specimens; ``noise_sd``), ``posterior_predictive`` and ``observed_data`` (``stress``, dims specimen x
step), ``log_likelihood`` (``stress``, dims specimen: summed over steps), ``constant_data``
(``time``, ``strain`` and optional ``temperature``) and, for samplers, ``sample_stats``.
Run attributes (method, guide, seed, command line, ...) sit on the ``posterior`` group.
Built from plain arrays: this module knows no solver or Pyro internals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import xarray as xr

from bayescal.arviz_import import az

from bayescal.output import write_atomically_by_name

#: The posterior's population variables of a varying parameter, by suffix: physical moments
#: (the contract), then the logistic-normal's latent location and scale in z.
POPULATION_SUFFIXES = ("_pop_mean", "_pop_sd", "_pop_loc", "_pop_scale")
#: Of those, the latent ones: coordinates of the model, not quantities to report.
LATENT_SUFFIXES = ("_pop_loc", "_pop_scale")


def population_names(parameter: str) -> tuple[str, ...]:
    """The posterior's population variables of a varying ``parameter``."""
    return tuple(parameter + suffix for suffix in POPULATION_SUFFIXES)


def _chains(value, chains: bool) -> np.ndarray:
    """As numpy with a leading chain dimension (SVI/MAP draws are chain 0)."""
    array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
    return array if chains else array[None]


def build_inference_data(
    *,
    specimens: tuple[str, ...],
    posterior: Mapping[str, object],
    posterior_predictive: object,
    log_likelihood: object,
    observed: object,
    constant: Mapping[str, object],
    attrs: Mapping[str, object],
    sample_stats: Mapping[str, object] | None = None,
    chains: bool = False,
) -> az.InferenceData:
    """Assemble the contract's InferenceData.

    Arrays have leading (draw,) or, with ``chains``, (chain, draw); per-specimen posterior
    variables end with a specimen dimension; ``observed`` and ``constant`` values are
    (specimen, step) arrays with NaN where padded.
    """
    obs = np.asarray(observed)
    n_spec, n_step = obs.shape
    coords = {"specimen": list(specimens), "step": np.arange(n_step)}

    def dataset(variables: Mapping[str, object], dims_of, sampled: bool = True) -> xr.Dataset:
        data = {}
        for name, value in variables.items():
            array = _chains(value, chains) if sampled else np.asarray(value)
            extra = dims_of(name, array.ndim - (2 if sampled else 0))
            dims = (["chain", "draw"] if sampled else []) + extra
            data[name] = (dims, array)
        ds = xr.Dataset(data)
        for dim in ("specimen", "step"):
            if dim in ds.dims:
                ds = ds.assign_coords({dim: coords[dim]})
        if sampled:
            ds = ds.assign_coords(chain=np.arange(ds.sizes["chain"]),
                                  draw=np.arange(ds.sizes["draw"]))
        return ds

    def specimen_dims(name, rank):
        return ["specimen", "step"][:rank]

    groups = {
        "posterior": dataset(posterior, specimen_dims),
        "posterior_predictive": dataset({"stress": posterior_predictive}, specimen_dims),
        "log_likelihood": dataset({"stress": log_likelihood}, specimen_dims),
        "observed_data": dataset({"stress": obs}, specimen_dims, sampled=False),
        "constant_data": dataset(dict(constant), specimen_dims, sampled=False),
    }
    if sample_stats is not None:
        groups["sample_stats"] = dataset(sample_stats, lambda name, rank: [])
    groups["posterior"].attrs.update(_netcdf_attrs(attrs))
    return az.InferenceData(**groups)


def _netcdf_attrs(attrs: Mapping[str, object]) -> dict:
    """netCDF-safe attributes: numbers, strings and 1-D numeric arrays; None becomes ''."""
    out = {}
    for key, value in attrs.items():
        if value is None:
            value = ""
        elif isinstance(value, bool):
            value = int(value)
        elif isinstance(value, (list, tuple)):
            value = np.asarray(value, dtype=float)
        out[key] = value
    return out


def write_netcdf(idata: az.InferenceData, path: Path) -> None:
    """Write ``idata`` to ``path`` atomically (:func:`bayescal.output.write_atomically_by_name`):
    a failed write leaves any earlier file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically_by_name(path, lambda tmp: idata.to_netcdf(tmp, engine="h5netcdf"))
