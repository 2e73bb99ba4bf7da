"""The ``bayescal`` command line: parsing and printing only, over the library.

Every command is one pair of functions, ``_add_<command>(subparsers)`` (declares its parser and
returns it) and ``_run_<command>(args) -> int`` (runs it, returns the exit status), registered
in :data:`COMMANDS`. Options shared by every command (:func:`_common_options`) are accepted
before or after the command name.

Exit status: 0 success, 1 a failed check or an unexpected error (one line, and a hint to rerun
with ``--debug`` for the traceback), 2 bad input (:class:`~bayescal.errors.BadInput`: one line,
no traceback) or a usage error, 130 an interrupt (Ctrl-C, one line) at any moment.

Building the parser imports nothing heavy (no torch): ``bayescal --help`` answers at once.
Commands whose options need the library (``fit``, ``import``) declare them lazily
(:class:`_LazyParser`), only when that command is parsed or its help is shown.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
import warnings
from typing import Callable, Sequence

from bayescal.errors import BadInput, BayescalWarning, InvalidSetting

PROG = "bayescal"
#: Largest --seed: the seeding of numpy's legacy generator (through Pyro) takes 32 bits.
SEED_MAX = 2**32 - 1


# ---------------------------------------------------------------------------- common options


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options of every command. On subcommands their defaults are suppressed, so that a value
    given before the command name is not overwritten by the subcommand's default."""
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    group = parser.add_argument_group("common options")
    group.add_argument("--threads", type=int, metavar="N", default=default(1),
                       help="compute threads per process (default: 1; small-tensor work is "
                            "slower with more)")
    group.add_argument("--debug", action="store_true", default=default(False),
                       help="show the full traceback of an unexpected error")


class _LazyParser(argparse.ArgumentParser):
    """A subcommand parser whose own options are declared by ``declare(parser)`` only when it
    is used (parsed, or its help shown), so that the top-level parser needs no imports."""

    declare: Callable[[argparse.ArgumentParser], None] | None = None

    def _declared(self) -> None:
        declare, self.declare = self.declare, None
        if declare is not None:
            declare(self)

    def parse_known_args(self, args=None, namespace=None):
        self._declared()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._declared()
        return super().format_help()

    def format_usage(self) -> str:
        self._declared()
        return super().format_usage()


def _command(subparsers, name: str, help: str, description: str | None = None,
             declare: Callable[[argparse.ArgumentParser], None] | None = None
             ) -> argparse.ArgumentParser:
    """A subcommand parser carrying the common options; ``declare(parser)``, if given, adds
    the command's own options when they are first needed. ``help`` is plain text (argparse
    %-formats it: a literal % is escaped here)."""
    parser = subparsers.add_parser(name, help=help.replace("%", "%%"),
                                   description=description or help)
    _common_options(parser, suppress=True)
    parser.declare = declare
    return parser


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= SEED_MAX:
        raise BadInput(f"--seed must be an integer from 0 to {SEED_MAX}, got {seed}")


def _device_option(parser: argparse.ArgumentParser) -> None:
    """``--device``, offered by the commands that integrate on it (check, simulate)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the integration runs (default: cpu)")


def _workers_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--workers``, offered by the commands that can shard their solves (fit, predict)."""
    parser.add_argument("--workers", type=int, default=1, metavar="K",
                        help=f"local processes sharing the {what}, one rank each over "
                             "torch.distributed (gloo); under torchrun or srun the launcher's "
                             "ranks are used instead (default: 1; docs/scaling.md)")


def _distributed(args: argparse.Namespace, check) -> tuple[object, bool]:
    """``(communicator, launched)`` of a command that can run on several ranks: a
    communicator when this process is one rank of a job (torchrun, srun, or a worker of
    ``--workers``), None for one process; ``launched`` when ``--workers K`` (K > 1) asks for
    local workers, which :func:`_launch` starts. ``check(k)`` validates a worker count
    against the input (``count`` items to share)."""
    from bayescal.distributed import from_environment, world_from_environment

    placed = world_from_environment()
    if placed is None:
        check(args.workers)
        return None, args.workers > 1
    if args.workers not in (1, placed[1]):
        raise BadInput(f"--workers {args.workers}: this process is one of {placed[1]} ranks "
                       "started by a launcher (torchrun, srun); give --workers only without one")
    check(placed[1])
    return from_environment(), False


def _launch(args: argparse.Namespace) -> int:
    from bayescal.workers import launch

    return launch(args.argv, args.workers)


def _device(args: argparse.Namespace):
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: CUDA is not available on this machine (use --device cpu)")
    return torch.device(args.device)


# ------------------------------------------------------------------------------------ models


def _add_models(subparsers) -> argparse.ArgumentParser:
    return _command(subparsers, "models", "list the built-in material models")


def _run_models(args: argparse.Namespace) -> int:
    from bayescal.catalogue import CATALOGUE

    rows = [("model", "parameters", "state", "summary")]
    rows += [(name, ", ".join(entry.parameters), ", ".join(entry.state_names), entry.summary)
             for name, entry in CATALOGUE.items()]
    _print_table(rows)
    return 0


# ------------------------------------------------------------------------------------- check


def _add_check(subparsers) -> argparse.ArgumentParser:
    parser = _command(
        subparsers, "check", "verify a model card's model and solver settings",
        "Analytic Jacobian vs autograd, adjoint gradient vs finite differences, chunked vs "
        "sequential solve, the integration error of the card's grid with its observed order, "
        "and a response that leaves the elastic range, at the prior centres. Exit status 1 if "
        "any check fails.")
    parser.add_argument("card", metavar="CARD", help="model card (TOML)")
    parser.add_argument("--load", metavar="LOAD.csv",
                        help="load path (default: a built-in informative path)")
    _device_option(parser)
    return parser


def _run_check(args: argparse.Namespace) -> int:
    from bayescal.card import load_card
    from bayescal.check import check_model
    from bayescal.data import read_load_path

    device = _device(args)
    spec = load_card(args.card)
    load = read_load_path(args.load) if args.load else None
    results = check_model(spec, load, device=device)
    where = args.load or "built-in informative path"
    print(f"{spec.path}: model {spec.model}, load {where}")
    _print_table([("check", "value", "tolerance", "result", "detail")] + [
        (r.name, f"{r.value:.3g}", f"{r.tolerance:g}", "PASS" if r.passed else "FAIL", r.detail)
        for r in results])
    failed = [r.name for r in results if not r.passed]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print(f"all {len(results)} checks passed")
    return 0


# ---------------------------------------------------------------------------------- simulate


def _add_simulate(subparsers) -> argparse.ArgumentParser:
    parser = _command(
        subparsers, "simulate", "synthetic data from a card's prior population",
        "Draw specimens from the card's prior population (prior centres, specimen-to-specimen "
        "spread), simulate them on a load path and write the data CSV and, beside it, "
        "<out stem>.params.csv with each specimen's parameters.")
    parser.add_argument("card", metavar="CARD", help="model card (TOML)")
    parser.add_argument("--load", metavar="LOAD.csv", required=True,
                        help="load path: time, strain (optionally specimen, temperature, "
                             "labels)")
    parser.add_argument("--specimens", metavar="K", type=int,
                        help="number of specimens (default: one per specimen id of the load "
                             "file, else 1)")
    parser.add_argument("--seed", metavar="S", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--noise", metavar="SD", type=float, default=0.0,
                        help="measurement noise sd in MPa (default: 0)")
    parser.add_argument("--out", metavar="data.csv", required=True, help="data file to write")
    _device_option(parser)
    return parser


def _run_simulate(args: argparse.Namespace) -> int:
    from bayescal.card import load_card
    from bayescal.synthetic import (
        output_paths,
        read_simulation_load,
        simulate_experiments,
        write_synthetic,
    )

    device = _device(args)
    _check_seed(args.seed)
    output_paths(args.out)
    spec = load_card(args.card)
    load = read_simulation_load(args.load, args.specimens)
    synthetic = simulate_experiments(spec, load, seed=args.seed, noise_sd=args.noise,
                                     device=device)
    data, params = write_synthetic(synthetic, args.out)
    print(f"wrote {data} ({load.n_specimens} specimens, {sum(load.n_points)} points) "
          f"and {params}")
    return 0


# --------------------------------------------------------------------------------------- fit


def _add_fit(subparsers) -> argparse.ArgumentParser:
    return _command(
        subparsers, "fit", "calibrate a card's hierarchical model against data",
        "Fit the population, each specimen's parameters and the noise. MAP (damped Newton) and a "
        "Laplace approximation always come first; --method svi then refines the chosen guide, "
        "--method nuts samples the posterior from there. "
        "Writes DIR/posterior.nc (ArviZ InferenceData), checkpoints and figures.", _fit_options)


def _fit_options(parser: argparse.ArgumentParser) -> None:
    from bayescal.fit import METHODS
    from bayescal.inference.nuts import INITS, NUTSConfig
    from bayescal.inference.svi import GUIDES, SVIConfig

    defaults, sampler = SVIConfig(), NUTSConfig()
    parser.add_argument("card", metavar="CARD", help="model card (TOML)")
    parser.add_argument("--data", metavar="DATA.csv", required=True, help="test data (long CSV)")
    parser.add_argument("--method", choices=METHODS, default="laplace",
                        help="map: the posterior mode only; laplace: the Gaussian guide at the "
                             "Laplace approximation, no SVI steps; svi: the guide refined by SVI; "
                             "nuts: No-U-Turn sampling (default: laplace, the best calibrated in "
                             "benchmarks/sbc.py)")
    parser.add_argument("--guide", choices=GUIDES, default=None,
                        help=f"SVI guide (default: {defaults.guide}; map implies delta)")
    parser.add_argument("--steps", type=int, default=defaults.steps, metavar="N",
                        help=f"most SVI steps; stops earlier on an ELBO plateau "
                             f"(default: {defaults.steps})")
    parser.add_argument("--lr", type=float, default=defaults.lr, metavar="X",
                        help=f"initial Adam learning rate (default: {defaults.lr})")
    parser.add_argument("--particles", type=int, default=defaults.particles, metavar="P",
                        help=f"ELBO particles per step, solved in one batch "
                             f"(default: {defaults.particles})")
    parser.add_argument("--draws", type=int, default=1000, metavar="D",
                        help="posterior draws stored, for map, laplace and svi (nuts: --samples per "
                             "chain; default: 1000)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    centering = parser.add_mutually_exclusive_group()
    centering.add_argument("--centered", dest="centered", action="store_const", const=True,
                           default=None, help="sample every specimen value centered")
    centering.add_argument("--non-centered", dest="centered", action="store_const",
                           const=False, help="sample every specimen value through offsets "
                                             "(default for map, laplace and svi; nuts "
                                             "chooses per parameter from the data unless "
                                             "one of these is given)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from DIR/checkpoint.pt when it exists (it must come "
                             "from a run with the same card, data, method, guide and seed)")
    parser.add_argument("--compile", action="store_true",
                        help="compile a NEML2 model with neml2.compile: minutes per new shape, "
                             "then faster per step; pays off for long SVI runs (docs/neml2.md)")
    group = parser.add_argument_group("NUTS (--method nuts)")
    group.add_argument("--chains", type=int, default=sampler.chains, metavar="K",
                       help=f"chains, run in parallel processes (default: {sampler.chains})")
    group.add_argument("--warmup", type=int, default=sampler.warmup, metavar="W",
                       help=f"warm-up draws per chain (default: {sampler.warmup})")
    group.add_argument("--samples", type=int, default=sampler.samples, metavar="S",
                       help=f"draws kept per chain (default: {sampler.samples})")
    group.add_argument("--max-tree-depth", type=int, default=sampler.max_tree_depth,
                       metavar="D", help=f"most trajectory doublings (default: "
                                         f"{sampler.max_tree_depth})")
    group.add_argument("--target-accept", type=float, default=sampler.target_accept,
                       metavar="X", help=f"target acceptance probability of step-size "
                                         f"adaptation (default: {sampler.target_accept})")
    group.add_argument("--init", choices=INITS, default=sampler.init,
                       help="start from the Laplace approximation (map) or the full-rank SVI "
                            f"guide (svi), position and mass matrix (default: {sampler.init})")
    group.add_argument("--dense-mass", action="store_true",
                       help="adapt a dense mass matrix on top of the starting approximation's "
                            "(default: diagonal)")
    parser.add_argument("--no-importance", action="store_true",
                        help="store the approximation's own draws, not the ones resampled with "
                             "their Pareto-smoothed importance weights (laplace and svi resample "
                             "by default when Pareto k-hat < 0.7)")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    _workers_option(parser, "specimens' solves")
    parser.add_argument("--out", metavar="DIR", required=True, help="output directory")


def _run_fit(args: argparse.Namespace) -> int:
    import dataclasses

    from bayescal.card import load_card
    from bayescal.data import read_experiments
    from bayescal.distributed import shutdown
    from bayescal.fit import check_draws, check_workers, fit_to_directory
    from bayescal.summary import trust_line
    from bayescal.inference.nuts import NUTSConfig
    from bayescal.inference.svi import SVIConfig
    from bayescal.output import prepare_output_folder

    if args.method == "nuts" and args.guide not in (None, "mvn"):
        raise BadInput(f"--method nuts takes no --guide {args.guide} (it starts from the "
                       "full-rank Laplace or SVI approximation)")
    _check_seed(args.seed)
    if args.method == "map" and args.guide not in (None, "delta"):
        raise BadInput(f"--method map takes no --guide {args.guide} (MAP is the delta guide)")
    if args.method == "laplace" and args.guide == "delta":
        raise BadInput("--method laplace needs a Gaussian --guide (normal, lowrank or mvn)")
    out = prepare_output_folder(args.out, create=False)
    spec = load_card(args.card)
    if args.compile:
        if spec.backend != "neml2":
            raise BadInput(f"{spec.path}: --compile applies only to NEML2 cards "
                           "([model] backend = \"neml2\")")
        spec = dataclasses.replace(spec, compile=True)
    experiments = read_experiments(args.data)
    guide = "delta" if args.method == "map" else (args.guide or SVIConfig().guide)
    config = SVIConfig(guide=guide, steps=args.steps, lr=args.lr, particles=args.particles)
    sampler = NUTSConfig(chains=args.chains, warmup=args.warmup, samples=args.samples,
                         max_tree_depth=args.max_tree_depth, target_accept=args.target_accept,
                         init=args.init, dense=args.dense_mass)
    check_draws(args.draws)
    comm, launched = _distributed(args, lambda k: check_workers(k, experiments))
    if launched:
        return _launch(args)
    idata = fit_to_directory(spec, experiments, out, figures=not args.no_figures, method=args.method,
                             config=config, draws=args.draws, seed=args.seed,
                             centered=args.centered, resume=args.resume, command=args.command_line,
                             nuts=sampler, importance=not args.no_importance, comm=comm)
    shutdown(comm)
    attrs = idata.posterior.attrs
    if args.method == "nuts":
        print(f"wrote {out / 'posterior.nc'} (nuts, {args.chains} chains x {args.samples} draws "
              f"after {args.warmup} warm-up, {attrs['fit_time_s']:.0f} s, {attrs['divergences']} "
              f"divergent transitions, {attrs['solver_failures']} solver failures rejected)")
    else:
        print(f"wrote {out / 'posterior.nc'} ({args.method}, guide {guide}, {attrs['steps']} "
              f"evaluations, {attrs['fit_time_s']:.0f} s fit, {attrs['solver_retries']} solver "
              f"retries, {attrs['skipped_steps']} skipped steps)")
    if "pareto_k" in attrs:
        print(trust_line(attrs))
    print(f"integration: {attrs['scheme']}, {attrs['integration_steps']} steps, estimated "
          f"error at the {attrs['integration_error_at']} {attrs['integration_error_rms']:.2g} MPa "
          f"rms, {attrs['integration_error_max']:.2g} MPa at worst")
    return 0


# ----------------------------------------------------------------------------------- summary


def _add_summary(subparsers) -> argparse.ArgumentParser:
    parser = _command(subparsers, "summary", "posterior means, sd and 90% intervals")
    parser.add_argument("posterior", metavar="POSTERIOR.nc", help="a fit's posterior.nc")
    parser.add_argument("--population", action="store_true",
                        help="only population-level variables (no per-specimen rows)")
    _misfit_option(parser, "default: none")
    return parser


def _run_summary(args: argparse.Namespace) -> int:
    from bayescal.summary import format_summary, load_posterior

    from bayescal.compare import format_misfit

    idata = load_posterior(args.posterior)
    misfits = [format_misfit({"": idata}, by) for by in args.by or ()]  # bad labels first
    print(format_summary(idata, population_only=args.population))
    for misfit in misfits:
        print()
        print(misfit)
    return 0


# ----------------------------------------------------------------------------------- compare


def _add_compare(subparsers) -> argparse.ArgumentParser:
    parser = _command(
        subparsers, "compare", "leave-one-specimen-out PSIS-LOO of fits of the same data",
        "Compare fits of the same data by leave-one-specimen-out PSIS-LOO (arviz.compare on "
        "each fit's per-specimen log likelihood): elpd, its se, the difference to the best "
        "and its se, stacking weights, Pareto k warnings; and the misfit of each fit by label.")
    parser.add_argument("posteriors", metavar="POSTERIOR.nc", nargs="+",
                        help="two or more fits' posterior.nc")
    _misfit_option(parser, "default: every label of the data")
    parser.add_argument("--out", metavar="FIG.png",
                        help="write ArviZ's compare plot here (.png, .pdf, .svg, ...)")
    return parser


def _misfit_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--by", metavar="LABEL", action="append",
                        help="rms misfit (data minus posterior-predictive mean) by this label "
                             f"column, or 'specimen'; repeatable ({default})")


def _run_compare(args: argparse.Namespace) -> int:
    from bayescal.compare import (compare_fits, fit_names, format_comparison, format_misfit,
                                  labels, plot_comparison)
    from bayescal.summary import load_posterior

    if len(args.posteriors) < 2:
        raise BadInput("compare needs at least two fits (POSTERIOR.nc files)")
    names = fit_names(args.posteriors)
    fits = {name: load_posterior(path) for name, path in zip(names, args.posteriors)}
    paths = dict(zip(names, args.posteriors))
    table, high = compare_fits(fits, paths)
    first = next(iter(fits.values()))
    misfits = [format_misfit(fits, by) for by in args.by or list(labels(first))]
    print(format_comparison(table, high, first.observed_data.sizes["specimen"]))
    for misfit in misfits:
        print()
        print(misfit)
    if args.out:
        plot_comparison(table, args.out)
        print(f"\nwrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------ import


def _add_import(subparsers) -> argparse.ArgumentParser:
    return _command(
        subparsers, "import", "convert a folder of test files to the data CSV",
        "Read a folder of MatCal-style tension test files (line 1 a Python dict of state "
        "values, then a header with time, engineering_strain and engineering_stress), drop "
        "pre-load points, trim each curve at its maximum engineering stress, convert to true "
        "strain and true stress in MPa (temperature Rankine to K) and write the data CSV.",
        _import_options)


def _import_options(parser: argparse.ArgumentParser) -> None:
    from bayescal.importers import STRESS_UNITS

    parser.add_argument("format", choices=("matcal",), metavar="FORMAT",
                        help="test file format: matcal")
    parser.add_argument("directory", metavar="DIR", help="folder of test files, one a specimen")
    parser.add_argument("--out", metavar="data.csv", required=True, help="data file to write")
    parser.add_argument("--stress-unit", choices=tuple(STRESS_UNITS), default="ksi",
                        help="unit of engineering_stress in the files (default: ksi)")
    parser.add_argument("--keep-engineering", action="store_true",
                        help="write engineering strain and stress (default: true values)")
    parser.add_argument("--no-trim", action="store_true",
                        help="keep the points after the maximum engineering stress")
    parser.add_argument("--glob", metavar="PATTERN", default="*.csv",
                        help="which files of DIR to read (default: *.csv)")


def _run_import(args: argparse.Namespace) -> int:
    from bayescal.importers import format_import, import_matcal

    result = import_matcal(args.directory, args.out, stress_unit=args.stress_unit,
                           engineering=args.keep_engineering, trim=not args.no_trim,
                           pattern=args.glob)
    print(format_import(result))
    return 0


# -------------------------------------------------------------------------------------- plot


def _add_plot(subparsers) -> argparse.ArgumentParser:
    parser = _command(
        subparsers, "plot", "a figure of test data before fitting",
        "Stress against strain (or time) of every specimen of a data file, coloured by a "
        "numeric label (log colour scale when it spans more than a decade), or one panel per "
        "value of a label with --by. Written atomically in the format of --out's suffix.")
    parser.add_argument("data", metavar="DATA.csv", help="test data (long CSV)")
    parser.add_argument("--out", metavar="FIG.png", required=True,
                        help="figure to write (.png, .pdf, .svg, ...)")
    parser.add_argument("--by", metavar="LABEL",
                        help="one panel per value of this label (2 to 12 values)")
    parser.add_argument("--x", choices=("strain", "time"), default="strain",
                        help="horizontal axis: strain, or time since each specimen's first "
                             "point (default: strain)")
    parser.add_argument("--colour", metavar="LABEL",
                        help="numeric label that colours the curves (default: the first "
                             "numeric label that varies, other than --by)")
    return parser


def _run_plot(args: argparse.Namespace) -> int:
    from bayescal.data import read_experiments
    from bayescal.plots import plot_data

    experiments = read_experiments(args.data)
    plot_data(experiments, args.out, by=args.by, x=args.x, colour=args.colour)
    panels = f", {len(set(experiments.labels[args.by]))} panels by {args.by}" if args.by else ""
    print(f"wrote {args.out} ({experiments.n_specimens} specimens, "
          f"{sum(experiments.n_points)} points{panels})")
    return 0


# ----------------------------------------------------------------------------------- predict


def _add_predict(subparsers) -> argparse.ArgumentParser:
    parser = _command(
        subparsers, "predict", "propagate a posterior through new load paths",
        "Each draw is a new specimen from the fitted population (or, with --fitted, a fitted "
        "specimen), solved on every load path in batched solves. Writes DIR/predictions.nc, "
        "DIR/bands.csv (mean and 5/50/95% quantiles per point) and DIR/bands.png.")
    parser.add_argument("posterior", metavar="POSTERIOR.nc", help="a fit's posterior.nc")
    parser.add_argument("--load", metavar="LOAD.csv", required=True,
                        help="load path(s): time, strain, optionally keyed by specimen")
    parser.add_argument("--draws", type=int, default=500, metavar="N",
                        help="posterior draws (default: 500)")
    parser.add_argument("--fitted", action="store_true",
                        help="predict the fitted specimens, not new ones from the population")
    parser.add_argument("--no-noise", action="store_true",
                        help="bands of the model response without measurement noise")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    parser.add_argument("--card", metavar="CARD",
                        help="model card (default: the card stored with the posterior)")
    parser.add_argument("--no-figures", action="store_true", help="skip the figure")
    _workers_option(parser, "draws' solves")
    parser.add_argument("--out", metavar="DIR", required=True, help="output directory")
    return parser


def _run_predict(args: argparse.Namespace) -> int:
    from bayescal.data import has_specimen_column, read_load_path
    from bayescal.distributed import shutdown
    from bayescal.fit import package_versions
    from bayescal.output import prepare_output_folder
    from bayescal.predict import load_for_prediction, predict_to_directory

    _check_seed(args.seed)
    out = prepare_output_folder(args.out, create=False)
    idata, spec = load_for_prediction(args.posterior, args.card)
    fitted = [str(s) for s in idata.posterior["specimen"].values] if "specimen" in \
        idata.posterior.dims else []
    load = read_load_path(args.load)
    if args.fitted and not has_specimen_column(args.load):  # one path for every fitted specimen
        load = read_load_path(args.load, specimens=fitted)
    comm, launched = _distributed(args, lambda k: _check_predict_workers(k, args))
    if launched:
        return _launch(args)
    attrs = {"posterior": str(args.posterior), "method": idata.posterior.attrs.get("method", ""),
             "seed": args.seed, "draws": args.draws, "command": args.command_line,
             "versions": package_versions()}
    prediction = predict_to_directory(idata, load, out, attrs=attrs,
                                      figures=not args.no_figures, draws=args.draws,
                                      fitted=args.fitted, seed=args.seed,
                                      noise=not args.no_noise, spec=spec, progress=True,
                                      comm=comm)
    shutdown(comm)
    for note in prediction.notes:
        print(f"note: {note}")
    kind = "fitted specimens" if args.fitted else "new specimens"
    print(f"wrote {out / 'predictions.nc'}, {out / 'bands.csv'}"
          + ("" if args.no_figures else f", {out / 'bands.png'}")
          + f" ({args.draws} draws, {kind}, {load.n_specimens} paths)")
    return 0


def _check_predict_workers(workers: int, args: argparse.Namespace) -> None:
    """Every worker of a prediction needs at least one draw to solve."""
    if workers < 1:
        raise BadInput(f"--workers must be at least 1, got {workers}")
    if 1 <= args.draws < workers:  # (a bad --draws is reported by predict itself)
        raise BadInput(f"--workers {workers}: more workers than draws ({args.draws}); each "
                       "worker needs at least one draw")


# ---------------------------------------------------------------------------------- registry

#: Every command: name -> (declare its parser, run it). Add new commands here.
COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "models": (_add_models, _run_models),
    "check": (_add_check, _run_check),
    "simulate": (_add_simulate, _run_simulate),
    "fit": (_add_fit, _run_fit),
    "summary": (_add_summary, _run_summary),
    "compare": (_add_compare, _run_compare),
    "predict": (_add_predict, _run_predict),
    "import": (_add_import, _run_import),
    "plot": (_add_plot, _run_plot),
}


#: Commands that compute nothing, and so answer without importing torch.
WITHOUT_TORCH = frozenset({"models"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Hierarchical Bayesian calibration of viscoplastic material "
                               "models against time-history test data.")
    _common_options(parser, suppress=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=_LazyParser)
    for name, (add, run) in COMMANDS.items():
        command = add(subparsers)
        if subparsers.choices.get(name) is not command:
            raise RuntimeError(f"COMMANDS[{name!r}]: its parser is not named {name!r}")
        command.set_defaults(run=run)
    return parser


# -------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status. An interrupt at any moment (while the
    parser imports the library, too) is exit status 130 with one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", BayescalWarning)
        shown = warnings.showwarning
        warnings.showwarning = lambda message, category, *rest, **kw: (
            _warning(str(message)) if issubclass(category, BayescalWarning)
            else shown(message, category, *rest, **kw))
        try:
            return _main(argv)
        except KeyboardInterrupt:
            _error("interrupted")
            return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (argparse printed it)
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args.command_line = shlex.join([PROG, *args.argv])
    if _rank() is not None:
        # when one rank fails, the launcher (or torchrun) stops the others with SIGTERM:
        # leave through Python, so that rank 0's open progress bar ends its line before the
        # launcher's error line rather than running into it
        signal.signal(signal.SIGTERM, _stopped)
    if _rank() not in (None, 0):  # one of several ranks: rank 0 alone talks to the user
        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore", BayescalWarning)
    try:
        if args.threads < 1:
            raise BadInput(f"--threads must be at least 1, got {args.threads}")
        if args.command not in WITHOUT_TORCH:
            import torch

            torch.set_default_dtype(torch.float64)
            torch.set_num_threads(args.threads)
        # figures are written to files: no display needed (a library caller keeps theirs)
        os.environ.setdefault("MPLBACKEND", "Agg")
        return args.run(args)
    except InvalidSetting as exc:  # named by the library's parameter: here, by its flag
        _error(exc.naming(f"--{exc.parameter.replace('_', '-')}"))
        return 2
    except BadInput as exc:
        _error(str(exc))
        return 2
    except Exception as exc:
        if args.debug:
            raise
        _error(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
               peer=_peer_failure(exc))
        return 1


def _rank() -> int | None:
    """This process's rank when it is one of several (torchrun, srun, --workers), else None
    (imports no torch)."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def _stopped(signum: int, frame) -> None:
    """SIGTERM in a rank: exit (status 128 + signal) through the open context managers."""
    raise SystemExit(128 + signum)


def _peer_failure(exc: BaseException) -> bool:
    """Whether an error is a collective operation failing because another rank stopped (its
    connection closed): then that rank's error is the one to report."""
    text = str(exc)
    return "gloo" in text or "Connection closed by peer" in text or \
        type(exc).__name__ in ("DistError", "DistBackendError", "DistNetworkError")


def _error(message: str, peer: bool = False) -> None:
    """One line on stderr; a worker of ``--workers`` writes it to its error file instead,
    for the launcher to report once (:mod:`bayescal.workers`)."""
    path = os.environ.get("BAYESCAL_ERROR_FILE")
    if path:
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(("(peer) " if peer else "") + _one_line(message) + "\n")
            return
        except OSError:
            pass
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)


def _warning(message: str) -> None:
    """A :class:`~bayescal.errors.BayescalWarning` as one line on stderr."""
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr)


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns; the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)] + [row[-1]]
        print("  ".join(cells).rstrip())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
