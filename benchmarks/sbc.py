"""Simulation-based calibration (Talts, Betancourt, Simpson, Vehtari & Gelman 2018) of
every fitting method.

Each replication draws a population, specimens and a noise sd from the card's own prior
(the Pyro model itself, :class:`bayescal.hierarchy.Hierarchy` traced with ``observed=False``,
seeded), simulates the specimens' stress on a short informative load path, fits it with
:func:`bayescal.fit.fit`, and records where each true value falls among the posterior draws:
``u = P(draw < truth)`` (0..1). For a calibrated method ``u`` is uniform, whatever the
problem, over replications; a method whose intervals are too narrow piles ``u`` up at 0 and 1.

Quantities, by level: **population** (``P_pop_mean`` and ``P_pop_sd`` of each varying
parameter), **specimen** (each specimen's ``P``), **noise** (``noise_sd``).

Methods: ``laplace`` (the full-rank Laplace approximation), ``svi-normal``, ``svi-lowrank``,
``svi-mvn`` (the guides after SVI) and ``nuts`` (short chains). The approximations are fitted
with ``importance=False``, and each is scored twice from the same fit: ``raw`` (the guide's
draws as they are) and ``stored`` (what ``bayescal fit`` stores by default: the draws
weighted with their Pareto-smoothed importance weights when k-hat < 0.7, else raw). The
weighted ``u`` is the weighted fraction of draws below the truth, which is what resampling
with those weights gives in expectation.

Summary per method, level and kind: coverage of the central 50 % and 90 % intervals
(``|u - 0.5| < level / 2``), and a chi-square test of uniformity of ``u`` over
:data:`BINS` bins (p-value; small = not calibrated). Pooling the specimens of one
replication makes the test somewhat optimistic (they share the population), so read small
p-values, not large ones. For the approximations also the median k-hat and the share of
fits with k-hat > 0.7.

The problem (:data:`CARD_TEXT`): perzyna-voce with sy and Rinf varying by specimen (d and
eta fixed, so that one fit takes seconds), :data:`SPECIMENS` specimens on the design's
informative path (rate jump, hold, unload, reload) with :data:`POINTS` recorded points per
segment, fixed sub-steps (the data are simulated with the same solver, so integration
error does not enter the calibration).

Usage::

    PYTHONPATH=. python benchmarks/sbc.py                      # full: 100 replications each
    PYTHONPATH=. python benchmarks/sbc.py --reps 30 --method-reps laplace=60 nuts=10
    PYTHONPATH=. python benchmarks/sbc.py --summarise          # table and figure again

Results: ``benchmarks/results/sbc.json`` (one record per replication and method, written
after each, so that a killed run resumes where it stopped), ``sbc_table.txt`` (the summary)
and ``sbc.png`` (rank histograms).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import pyro
import torch
from pyro import poutine
from scipy import stats

from bayescal.card import parse_card
from bayescal.check import piecewise_path
from bayescal.data import Experiments
from bayescal.fit import fit
from bayescal.hierarchy import Hierarchy, SolverFailure
from bayescal.inference.importance import K_USABLE
from bayescal.inference.nuts import NUTSConfig
from bayescal.inference.svi import SVIConfig

RESULTS = HERE / "results"
CARD_TEXT = """\
# SBC problem: perzyna-voce with two parameters varying by specimen.
[model]
name = "perzyna-voce"

[solver]
n_chunk = 20
substeps = 2
rtol = 1e-12
atol = 1e-8

[parameters.E]
value = 200000.0

[parameters.sy]
bounds = [100.0, 600.0]
prior = [250.0, 60.0]
varies = "specimen"
spread = 0.1

[parameters.Rinf]
bounds = [20.0, 600.0]
prior = [200.0, 60.0]
varies = "specimen"
spread = 0.1

[parameters.d]
value = 15.0

[parameters.eta]
value = 300.0

[parameters.n]
value = 3.0

[noise]
prior_scale = 10.0
"""
#: The informative path of the tests (rate jump, hold, unload, reload to 4 %).
SEGMENTS = ((20.0, 0.02), (0.1, 0.03), (100.0, 0.03), (1.5, 0.0285), (12.0, 0.04))
SPECIMENS = 4
POINTS = 6
#: Posterior draws kept per approximate fit; NUTS keeps its chain's samples.
DRAWS = 200
BINS = 10
LEVELS = ("population", "specimen", "noise")
METHODS = ("laplace", "svi-mvn", "svi-lowrank", "svi-normal", "nuts")
#: SVI steps at most (the plateau stop usually comes first).
SVI_STEPS = 500
#: NUTS: one chain (``--nuts-warmup``, ``--nuts-samples``, ``--nuts-depth`` change it).
NUTS = NUTSConfig(chains=1, warmup=150, samples=200, max_tree_depth=6, processes=1)


def card():
    return parse_card(CARD_TEXT, Path("benchmarks/sbc.toml"))


def blank_experiments(n: int, points: int) -> Experiments:
    t, e = piecewise_path(SEGMENTS, points)
    time_ = t[:, None].expand(-1, n).contiguous()
    strain = e[:, None].expand(-1, n).contiguous()
    mask = torch.ones_like(time_, dtype=torch.bool)
    return Experiments(tuple(f"S{i}" for i in range(n)), time_, strain, torch.zeros_like(time_),
                       mask, None, {}, "sbc")


def draw_problem(spec, blank: Experiments, seed: int):
    """Truth and data from the model's prior, seeded; a draw the solver cannot integrate is
    replaced by the next seed (counted). Returns (experiments, truth by variable name,
    redraws)."""
    h = Hierarchy(spec, blank)
    for attempt in range(100):
        pyro.set_rng_seed(10_000 * seed + attempt)
        try:
            with torch.no_grad():
                trace = poutine.trace(h).get_trace(observed=False)
        except SolverFailure:
            continue
        stress = trace.nodes["stress"]["value"]
        if not torch.isfinite(stress).all():
            continue
        truth = {name: h.transforms[name].forward(
            trace.nodes[f"{name}_pop_z"]["value"]
            + h.specimen_scale(name, trace.nodes[f"{name}_pop_z"]["value"],
                               trace.nodes[f"{name}_cv"]["value"])
            * trace.nodes[f"{name}_offset"]["value"]) for name in spec.varying}
        latents = {k: trace.nodes[k]["value"].reshape(1) for name in spec.varying
                   for k in (f"{name}_pop_z", f"{name}_cv")}
        truth.update({k: v[0] for k, v in h.population(latents).items()})
        truth["noise_sd"] = trace.nodes["noise_sd"]["value"]
        experiments = replace(blank, stress=stress.T.detach().clone())
        return experiments, {k: np.asarray(v, dtype=float) for k, v in truth.items()}, attempt
    raise RuntimeError(f"seed {seed}: no prior draw the solver could integrate")


def level_of(name: str) -> str | None:
    """The level a recorded quantity is scored at; None for quantities outside the documented
    set (early records also stored the unconstrained ``_pop_loc`` and ``_pop_scale``, which
    would otherwise be pooled with the population means and sds of only some replications)."""
    if name == "noise_sd":
        return "noise"
    if "_pop_" in name:
        return "population" if name.endswith(("_pop_mean", "_pop_sd")) else None
    return "specimen"


def fractions_below(draws: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``P(draw < truth)`` under the (normalised) draw weights, for each entry of ``truth``
    (draws: (draw, ...) matching truth's shape)."""
    below = draws < truth[None]
    return np.tensordot(weights, below.astype(float), axes=(0, 0))


def score(idata, truth: dict[str, np.ndarray]) -> dict:
    """``u`` per quantity, raw and as stored by default (weighted when k-hat < 0.7)."""
    post = idata.posterior
    n = post.sizes["chain"] * post.sizes["draw"]
    raw_w = np.full(n, 1.0 / n)
    k = float(post.attrs.get("pareto_k", np.nan))
    if "sample_stats" in idata.groups() and "log_weight" in idata.sample_stats:
        lw = idata.sample_stats["log_weight"].values.reshape(n)
        w = np.exp(lw - lw.max())
        stored_w = w / w.sum() if k < K_USABLE else raw_w
    else:
        stored_w = raw_w
    out = {"raw": {}, "stored": {}}
    for name, value in truth.items():
        draws = post[name].values.reshape(n, *post[name].shape[2:])
        for kind, weights in (("raw", raw_w), ("stored", stored_w)):
            out[kind][name] = np.atleast_1d(fractions_below(draws, value, weights)).tolist()
    return {"pareto_k": k, **out}


def run_one(method: str, spec, experiments: Experiments, seed: int, nuts: NUTSConfig = NUTS):
    if method == "nuts":
        return fit(spec, experiments, method="nuts", nuts=nuts, seed=seed, progress=False)
    if method == "laplace":
        return fit(spec, experiments, method="laplace", config=SVIConfig(guide="mvn"),
                   draws=DRAWS, seed=seed, progress=False, importance=False)
    guide = method.split("-", 1)[1]
    return fit(spec, experiments, method="svi", config=SVIConfig(guide=guide, steps=SVI_STEPS),
               draws=DRAWS, seed=seed, progress=False, importance=False)


def reps_by_method(args) -> dict[str, int]:
    """Replications per method: ``--reps`` (``--nuts-reps`` for nuts), or ``--method-reps``."""
    reps = {m: args.nuts_reps if m == "nuts" else args.reps for m in args.methods}
    for item in args.method_reps or ():
        method, _, count = item.partition("=")
        if method not in reps or not count.isdigit():
            raise SystemExit(f"--method-reps {item}: expected METHOD=N with METHOD one of "
                             f"{', '.join(reps)}")
        reps[method] = int(count)
    return reps


def run(args) -> list[dict]:
    """Every method's replications in turn (the cheap ones first, as ``--methods`` lists
    them), skipping those already in ``--out``."""
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.exists() else []
    done = {(r["method"], r["rep"]) for r in records}
    spec = card()
    blank = blank_experiments(args.specimens, args.points)
    nuts = replace(NUTS, warmup=args.nuts_warmup, samples=args.nuts_samples,
                   max_tree_depth=args.nuts_depth)
    for method, count in reps_by_method(args).items():
        for rep in range(count):
            if (method, rep) in done:
                continue
            experiments, truth, redraws = draw_problem(spec, blank, rep)
            start = time.perf_counter()
            try:
                idata = run_one(method, spec, experiments, seed=rep, nuts=nuts)
            except Exception as exc:  # noqa: BLE001  the fit failed: recorded, not scored
                records.append({"method": method, "rep": rep,
                                "failed": f"{type(exc).__name__}: {exc}"[:300]})
                out.write_text(json.dumps(records))
                print(f"rep {rep:3d} {method:12s} failed: {records[-1]['failed']}", flush=True)
                continue
            record = {"method": method, "rep": rep, "redraws": redraws,
                      "seconds": time.perf_counter() - start,
                      "noise_true": float(truth["noise_sd"]),
                      "draws": int(idata.posterior.sizes["draw"]), **score(idata, truth)}
            if method == "nuts":
                record["nuts"] = {"warmup": nuts.warmup, "samples": nuts.samples,
                                  "max_tree_depth": nuts.max_tree_depth,
                                  "divergences": int(idata.posterior.attrs["divergences"])}
            records.append(record)
            out.write_text(json.dumps(records))
            print(f"rep {rep:3d} {method:12s} k-hat {record['pareto_k']:6.2f} "
                  f"{record['seconds']:5.1f} s", flush=True)
    return records


def summarise(records: list[dict]) -> tuple[str, list[dict]]:
    """Coverage table and uniformity p-values per method, level and kind."""
    rows = []
    for method in METHODS:
        mine = [r for r in records if r["method"] == method and "raw" in r]
        if not mine:
            continue
        ks = np.array([r["pareto_k"] for r in mine])
        kinds = ("raw",) if method == "nuts" else ("raw", "stored")
        for kind in kinds:
            for level in LEVELS:
                u = np.array([x for r in mine for name, values in r[kind].items()
                              if level_of(name) == level for x in values])
                counts = np.histogram(u, bins=BINS, range=(0, 1))[0]
                rows.append({
                    "method": method, "kind": kind, "level": level, "reps": len(mine),
                    "values": len(u),
                    "cover50": float(np.mean(np.abs(u - 0.5) < 0.25)),
                    "cover90": float(np.mean(np.abs(u - 0.5) < 0.45)),
                    "uniform_p": float(stats.chisquare(counts).pvalue),
                    "k_median": float(np.nanmedian(ks)) if method != "nuts" else float("nan"),
                    "k_above_0.7": float(np.mean(ks > K_USABLE)) if method != "nuts"
                    else float("nan"),
                    "seconds_median": float(np.median([r["seconds"] for r in mine])),
                    "counts": counts.tolist()})
    head = (f"{'method':12s} {'draws':6s} {'level':10s} {'reps':>4s} {'50%':>6s} {'90%':>6s} "
            f"{'unif p':>8s} {'k med':>6s} {'k>0.7':>6s} {'s/fit':>6s}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['method']:12s} {r['kind']:6s} {r['level']:10s} {r['reps']:4d} "
                     f"{r['cover50']:6.2f} {r['cover90']:6.2f} {r['uniform_p']:8.2g} "
                     f"{r['k_median']:6.2f} {r['k_above_0.7']:6.2f} {r['seconds_median']:6.1f}")
    return "\n".join(lines), rows


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({(r["method"], r["kind"]) for r in rows},
                    key=lambda mk: (METHODS.index(mk[0]), mk[1]))
    fig, axes = plt.subplots(len(series), len(LEVELS), figsize=(9, 1.7 * len(series)),
                             squeeze=False, sharex=True)
    for i, (method, kind) in enumerate(series):
        for j, level in enumerate(LEVELS):
            ax = axes[i, j]
            row = next((r for r in rows if (r["method"], r["kind"], r["level"])
                        == (method, kind, level)), None)
            if row is None:
                ax.axis("off")
                continue
            counts = np.asarray(row["counts"])
            expected = counts.sum() / BINS
            ax.bar((np.arange(BINS) + 0.5) / BINS, counts, width=1 / BINS, color="C0",
                   edgecolor="white")
            band = stats.binom.ppf([0.005, 0.995], counts.sum(), 1 / BINS)
            ax.axhspan(*band, color="0.85", zorder=0)
            ax.axhline(expected, color="k", lw=0.8)
            ax.set_yticks([])
            if i == 0:
                ax.set_title(level)
            if j == 0:
                ax.set_ylabel(f"{method}\n{kind}", rotation=0, ha="right", va="center",
                              fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("P(draw < truth)")
    fig.suptitle("SBC rank histograms (grey: 99 % band of a uniform histogram)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=100, help="replications per approximation")
    parser.add_argument("--nuts-reps", type=int, default=100, help="replications of nuts")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods, run in this order")
    parser.add_argument("--method-reps", nargs="+", metavar="METHOD=N",
                        help="replications of single methods (e.g. svi-normal=20 nuts=10)")
    parser.add_argument("--nuts-warmup", type=int, default=NUTS.warmup)
    parser.add_argument("--nuts-samples", type=int, default=NUTS.samples)
    parser.add_argument("--nuts-depth", type=int, default=NUTS.max_tree_depth,
                        help="NUTS's most trajectory doublings")
    parser.add_argument("--specimens", type=int, default=SPECIMENS)
    parser.add_argument("--points", type=int, default=POINTS, help="recorded points a segment")
    parser.add_argument("--out", default=str(RESULTS / "sbc.json"))
    parser.add_argument("--summarise", action="store_true", help="only the table and figure")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.read_text()) if args.summarise else run(args)
    table, rows = summarise(records)
    print(table)
    (out.parent / f"{out.stem}_table.txt").write_text(table + "\n")
    (out.parent / f"{out.stem}_summary.json").write_text(json.dumps(rows, indent=1))
    figure(rows, out.parent / f"{out.stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
