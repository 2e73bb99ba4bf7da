"""One fit, end to end: card + data -> inference -> draws -> InferenceData (+ figures).

:func:`fit` returns the InferenceData; :func:`fit_to_directory` also writes
``posterior.nc``, checkpoints and figures into a directory, never damaging an earlier
``posterior.nc`` when it fails part-way.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from typing import Iterable
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bayescal.arviz_import import az
import numpy as np
import torch

from bayescal.card import ModelSpec
from bayescal.data import Experiments
from bayescal.distributed import Communicator
from bayescal.errors import BayescalWarning, InvalidSetting
from bayescal.export import build_inference_data, population_names, write_netcdf
from bayescal.hierarchy import Hierarchy
from bayescal.inference.accuracy import integration_report, map_parameters, replan_at_map
from bayescal.inference.draws import (log_likelihood, posterior_draws, predictive_and_loglik,
                                      sample_guide, unpack_draws)
from bayescal.inference.importance import centered_caution, check_approximation, correct
from bayescal.inference.nuts import NUTSConfig, run_nuts
from bayescal.inference.laplace import MAPConfig
from bayescal.inference.packing import Packing, initial_values
from bayescal.inference.parameterisation import describe as describe_parameterisation
from bayescal.inference.svi import SVIConfig, run_svi
from bayescal.output import FolderLock

METHODS = ("map", "laplace", "svi", "nuts")


def package_versions() -> str:
    """Versions of bayescal and the packages its numbers depend on."""
    parts = []
    for name in ("bayescal", "torch", "pyro-ppl", "pyzag", "arviz"):
        try:
            parts.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name}=?")
    return " ".join(parts)


def _digest(parts) -> str:
    """SHA-256 of a sequence of byte strings, each length-prefixed (so that no two different
    sequences give the same stream)."""
    sha = hashlib.sha256()
    for part in parts:
        sha.update(len(part).to_bytes(8, "little") + part)
    return sha.hexdigest()


def substeps_attr(substeps: torch.Tensor) -> list:
    """The grid's steps per recorded interval for the output's attrs: whole numbers as
    ints, unless a step spans several intervals (fractions ``1 / k``), then all floats."""
    values = substeps.tolist()
    if all(m == int(m) for m in values):
        return [int(m) for m in values]
    return [float(m) for m in values]


def input_file_digest(spec: ModelSpec) -> str:
    """SHA-256 of a NEML2 card's input file ('' for a built-in model): stored with the fit,
    so that a card rebuilt from the posterior uses its input file only while unchanged."""
    return "" if spec.file is None else hashlib.sha256(Path(spec.file).read_bytes()).hexdigest()


def card_digest(spec: ModelSpec) -> str:
    """Hash of the card's text and, for a NEML2 card, of its input file's content."""
    return _digest([spec.text.encode("utf-8"), input_file_digest(spec).encode("ascii")])


def data_digest(experiments: Experiments) -> str:
    """Hash of the data's content: specimen ids, every column (padding included) and labels;
    not of its file name or formatting."""
    tensors = (experiments.time, experiments.strain, experiments.stress, experiments.mask,
               experiments.temperature)
    parts = ["\0".join(experiments.specimens).encode("utf-8"),
             repr(sorted(experiments.labels.items())).encode("utf-8")]
    parts += [b"" if t is None else t.detach().cpu().numpy().tobytes() for t in tensors]
    return _digest(parts)


def run_fingerprint(spec: ModelSpec, experiments: Experiments, method: str, guide: str,
                    seed: int, centered: bool | Iterable[str] | None) -> dict[str, str]:
    """What identifies a run for ``--resume``: a checkpoint continues only the run with the
    same card, data, method, guide, seed, parameterisation and package versions."""
    return {"card": card_digest(spec), "data": data_digest(experiments), "method": method,
            "guide": guide, "seed": str(seed), "centered": _centering_key(centered),
            "versions": package_versions()}


def _centering_key(centered: bool | Iterable[str] | None) -> str:
    if centered is None:
        return "automatic"
    if isinstance(centered, bool):
        return str(centered)
    return ",".join(sorted(centered))


#: Above this |strain| the data are probably in percent (strain is a fraction).
STRAIN_LIMIT = 1.0
#: Above this |stress| (MPa) the data are probably in another unit: no metal comes near it.
STRESS_LIMIT = 20_000.0
#: A fitted noise sd above this many times the card's noise prior scale says the model does
#: not describe the data (or the units are wrong).
NOISE_FACTOR = 3.0


def data_warnings(experiments: Experiments) -> list[str]:
    """Plain-word warnings about implausible units of the data (strain in percent, stress
    in Pa or psi)."""
    lines = []
    strain = float(experiments.strain[experiments.mask].abs().max())
    if strain > STRAIN_LIMIT:
        lines.append(f"{experiments.source}: the largest |strain| is {strain:.4g}, above "
                     f"{STRAIN_LIMIT:g}: is strain given in percent? bayescal reads strain as "
                     "a fraction (0.01 is 1 %)")
    if experiments.stress is not None:
        stress = float(experiments.stress[experiments.mask].abs().max())
        if stress > STRESS_LIMIT:
            lines.append(f"{experiments.source}: the largest |stress| is {stress:.4g}, above "
                         f"{STRESS_LIMIT:,.0f} MPa: is stress given in another unit (psi)? "
                         "bayescal reads stress in MPa")
    return lines


def noise_warnings(spec: ModelSpec, noise_sd: torch.Tensor) -> list[str]:
    """A plain-word warning when the fitted noise sd is far above the card's noise prior."""
    fitted = float(noise_sd.mean())
    if fitted > NOISE_FACTOR * spec.noise_prior_scale:
        return [f"the fitted noise sd is {fitted:.4g} MPa, more than {NOISE_FACTOR:g} times the "
                f"card's [noise] prior_scale of {spec.noise_prior_scale:g} MPa: the model does "
                "not describe the data (are strain and stress in the right units?)"]
    return []


def _warn(lines: list[str]) -> list[str]:
    for line in lines:
        warnings.warn(line, BayescalWarning, stacklevel=3)
    return lines


def numeric_labels(experiments: Experiments) -> dict[str, np.ndarray]:
    """The data's numeric per-specimen labels (e.g. ``strain_rate``), dims (specimen,)."""
    return {name: np.asarray(values, dtype=float) for name, values in experiments.labels.items()
            if all(isinstance(v, float) for v in values)}


def check_draws(draws: int) -> None:
    """The number of posterior draws to store must be at least 1."""
    if draws < 1:
        raise InvalidSetting("draws", f"must be at least 1, got {draws}")


def check_workers(workers: int, experiments: Experiments) -> None:
    """Every worker (rank) needs at least one specimen to solve."""
    if workers < 1:
        raise InvalidSetting("workers", f"must be at least 1, got {workers}")
    if workers > experiments.n_specimens:
        raise InvalidSetting("workers", f"{workers}: more workers than specimens "
                             f"({experiments.n_specimens} in {experiments.source}); each "
                             "worker needs at least one specimen")


def fit(spec: ModelSpec, experiments: Experiments, method: str = "laplace",
        config: SVIConfig = SVIConfig(), draws: int = 1000, seed: int = 0,
        centered: bool | Iterable[str] | None = None, checkpoint: Path | None = None,
        resume: bool = False,
        progress: bool = True, command: str = "",
        nuts: NUTSConfig = NUTSConfig(), map_config: MAPConfig = MAPConfig(),
        importance: bool = True, comm: Communicator | None = None) -> az.InferenceData:
    """Calibrate ``spec`` against ``experiments`` and return the posterior as InferenceData.

    The default method, the full-rank Laplace approximation, is the one that
    ``benchmarks/sbc.py`` found best calibrated (docs/fitting.md, "Is my posterior
    trustworthy?"). ``centered`` names the varying parameters sampled centered (``True``:
    all, ``False``: none); ``None`` (the default) lets NUTS choose per parameter from the
    data at the Laplace point (:mod:`bayescal.inference.parameterisation`) and means
    non-centered for the other methods.

    ``map_config`` sets the MAP/Laplace stage, ``config`` the SVI stage (for ``nuts``: the
    approximation it starts from), ``nuts`` the sampler; ``draws`` is the number of guide
    draws (``nuts``: its ``samples`` per chain). An approximate posterior (laplace, svi) is
    checked on its draws (Pareto k-hat of the importance ratios,
    :mod:`bayescal.inference.importance`) and, with ``importance`` and k-hat below 0.7,
    stored resampled with the smoothed weights.

    ``comm`` (:mod:`bayescal.distributed`): this process is one rank of several, each
    solving a shard of the specimens; every rank returns the same InferenceData, and only
    the writer (rank 0) shows progress or writes checkpoints.
    """
    if method not in METHODS:
        raise InvalidSetting("method", f"{method!r} is unknown; choose one of "
                             f"{', '.join(METHODS)}")
    check_draws(draws)
    check_workers(1 if comm is None else comm.world, experiments)
    progress = progress and (comm is None or comm.writer)
    if method == "map":
        config = replace(config, guide="delta")
    elif method == "laplace" and config.guide == "delta":
        raise InvalidSetting("guide", "delta cannot give a Laplace approximation; choose "
                             "normal, lowrank or mvn")
    start = time.perf_counter()
    notes = _warn(data_warnings(experiments))
    h = Hierarchy(spec, experiments, centered=bool(centered) if centered is None else centered,
                  comm=comm)
    fingerprint = run_fingerprint(spec, experiments, method, config.guide, seed, centered)
    if method == "nuts":
        sampled = run_nuts(h, nuts, config, seed=seed, progress=progress, map_config=map_config,
                           automatic=centered is None, resume=resume, fingerprint=fingerprint,
                           checkpoint_folder=None if checkpoint is None else checkpoint.parent)
        h = h.with_grid(sampled.substeps, centered=sampled.centered)
        chains = nuts.chains
        latents = unpack_draws(h, Packing(h, initial_values(h)), sampled.u.flatten(0, 1))
        run_attrs = {
            "guide": "",
            "init": nuts.init,
            "chains": nuts.chains,
            "warmup": nuts.warmup,
            "steps": nuts.samples,
            "max_tree_depth": nuts.max_tree_depth,
            "target_accept": nuts.target_accept,
            "dense_mass": nuts.dense,
            "divergences": int(sampled.stats["diverging"].sum()),
            "solver_failures": int(sampled.stats["solver_failures"].sum()),
            "warmup_solver_failures": sampled.warmup_solver_failures,
            "solver_retries": sampled.solver_retries,
            "init_steps": sampled.init_steps,
            "init_time_s": sampled.init_time,
            "fit_time_s": sampled.init_time + sampled.sampling_time,
            "specimen_sd_ratios": ", ".join(f"{name} {ratio:.3g}"
                                            for name, ratio in sampled.sd_ratios.items()),
        }
        sample_stats = dict(sampled.stats)
    else:
        result = run_svi(h, config, map_config, seed=seed, checkpoint_path=checkpoint,
                         resume=resume, progress=progress, fingerprint=fingerprint,
                         replan=replan_at_map if h.options.automatic else None,
                         svi_stage=method == "svi")
        h = result.hierarchy
        chains = 1
        latents = sample_guide(h, result.guide, draws, seed)
        run_attrs = {
            "guide": config.guide,
            "steps": result.state.total,
            "skipped_steps": result.state.skipped,
            "solver_retries": result.state.retries,
            "fit_time_s": result.wall_time,
            "log_joint_map": [-x for x in result.state.losses["map"]],
            "elbo": [-x for x in result.state.losses["guide"]],
            "resumed_from": result.resumed_from,
        }
        sample_stats = None
    # every draw solved once: for the stored posterior and, for a guide, its check
    post = posterior_draws(h, latents, unique=method == "map")
    if method != "nuts" and config.guide != "delta":
        if h.centered:
            notes += _warn([centered_caution(method, h.centered)])
        check = check_approximation(Packing(h, initial_values(h)), result.guide, latents,
                                    log_likelihood=log_likelihood(h, post).sum(-1))
        index, checked, sample_stats = correct(check, seed, importance)
        post = post.take(index)
        run_attrs.update(checked)
    notes += _warn(noise_warnings(spec, post.noise_sd))
    if method == "nuts":
        at, point = "posterior mean", {k: v.mean(0) for k, v in post.parameters.items()}
    else:
        at, point = "MAP", map_parameters(h, result.map_values)
    integration = integration_report(h, point, float(post.noise_sd.mean()), at)
    notes += _warn(integration.pop("warnings"))
    predictive, loglik = predictive_and_loglik(h, post, seed)
    variables = {**post.parameters, **post.population, "noise_sd": post.noise_sd}
    order = [n for name in spec.calibrated for n in (name, *population_names(name))
             if n in variables] + ["noise_sd"]
    by_chain = lambda x: x.reshape(chains, -1, *x.shape[1:])  # noqa: E731
    constant = {"time": experiments.time.T, "strain": experiments.strain.T}
    if experiments.temperature is not None:
        constant["temperature"] = experiments.temperature.T
    masked = lambda x: torch.where(experiments.mask.T, x, torch.nan).numpy()  # noqa: E731
    attrs = {
        "method": method,
        "model": spec.model,
        "card": str(spec.path),
        "card_toml": spec.text,
        "card_file_sha256": input_file_digest(spec),
        "data": experiments.source,
        "n_chunk": "automatic" if h.options.n_chunk is None else h.options.n_chunk,
        "scheme": h.options.scheme,
        "tolerance": h.options.tolerance if h.options.automatic else float("nan"),
        "substeps": substeps_attr(h.substeps),
        "integration_steps": h.grid.n_steps,
        **integration,
        "seed": seed,
        "draws": len(post.noise_sd),
        "centered": ",".join(name for name in spec.varying if name in h.centered),
        "parameterisation": ("automatic: " if centered is None and method == "nuts" else "")
        + describe_parameterisation(spec.varying, h.centered),
        **run_attrs,
        "wall_time_s": time.perf_counter() - start,
        "failed_draws": post.failed_draws,
        "versions": package_versions(),
        "command": command,
        "warnings": "\n".join(notes),
    }
    return build_inference_data(
        specimens=experiments.specimens,
        posterior={k: by_chain(variables[k]) for k in order},
        posterior_predictive=by_chain(predictive),
        log_likelihood=by_chain(loglik),
        observed=masked(experiments.stress.T),
        constant={**{k: masked(v) for k, v in constant.items()}, **numeric_labels(experiments)},
        attrs=attrs,
        sample_stats=sample_stats,
        chains=True,
    )


def fit_to_directory(spec: ModelSpec, experiments: Experiments, out: Path, *,
                     figures: bool = True, **kwargs) -> az.InferenceData:
    """:func:`fit`, then write ``out/posterior.nc`` (atomically) and figures into ``out``,
    holding the folder's lock (:class:`~bayescal.output.FolderLock`) throughout.

    On several ranks (``comm``) every rank fits, reading ``out``'s checkpoints on
    ``resume``, but only rank 0 holds the lock and writes."""
    out = Path(out)
    comm = kwargs.get("comm")
    if comm is not None and not comm.writer:
        return fit(spec, experiments, checkpoint=out / "checkpoint.pt", **kwargs)
    with FolderLock(out):
        idata = fit(spec, experiments, checkpoint=out / "checkpoint.pt", **kwargs)
        write_netcdf(idata, out / "posterior.nc")
        if figures:
            from bayescal.plots import write_fit_figures

            write_fit_figures(idata, spec, out)
    return idata
