"""Benchmark: the time of one gradient evaluation, this tree against a baseline revision,
side by side in one run.

The problem: for each built-in model's shipped card, ``--specimens`` specimens drawn from the
card's prior population (seed 0) on the informative load path (30 recorded points a segment,
:func:`bayescal.check.informative_path`), on the grid that the current tree plans at the
card's tolerance (the same grid for both trees). One gradient evaluation is the forward solve
plus the chunked adjoint of ``sum(w * stress)`` at the recorded points, with respect to every
calibrated parameter (``w`` from 0.5 to 1.5), through ``bayescal.integrate.integrate`` with
the card's solver options: what every MAP, SVI or NUTS step pays per specimen batch.

How: the baseline's ``bayescal`` package is extracted from git (``git archive``) into a
temporary directory. Each measurement is a fresh process (this script with ``--worker``) that
imports one tree's package, runs one warm-up gradient and then ``--repeats`` timed ones (one
torch thread), and prints the times, the gradient and the recorded stress. The two trees
alternate, ``--rounds`` rounds, the order swapped every round, so that a load change on the
shared machine hits both. Reported: per tree the best time over all its runs; the ratio
baseline/current of the best times within each round (median, and the range over rounds);
the largest relative difference of the gradients and the largest stress difference (MPa)
between the trees.

Usage::

    PYTHONPATH=. python benchmarks/gradient.py                 # ~2 min on 2 cores
    PYTHONPATH=. python benchmarks/gradient.py --specimens 12 64 --rounds 5

Writes ``benchmarks/results/gradient.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: ``main`` when the work on issue 12's cheaper gradient started.
BASELINE = "d0469b6"
MODELS = ("perzyna-voce", "chaboche", "voce-jc")
POINTS = 30


def problem(name: str, specimens: int):
    """The card, model, drawn parameters and the recorded path ``(n_rec, specimens)``."""
    import torch

    from bayescal.card import load_card, load_model
    from bayescal.check import informative_path
    from bayescal.hierarchy import draw_specimens

    spec = load_card(ROOT / "models" / f"{name}.toml")
    params = draw_specimens(spec, specimens, seed=0)
    t, e = informative_path(POINTS)
    expand = lambda x: x[:, None].expand(-1, specimens).contiguous()  # noqa: E731
    return spec, load_model(spec), params, expand(t).to(torch.float64), expand(e).to(torch.float64)


def plan(name: str, specimens: int) -> list[int]:
    """Sub-steps per recorded interval, planned by this tree at the card's tolerance."""
    import dataclasses

    from bayescal.integrate import plan_substeps

    spec, model, params, t, e = problem(name, specimens)
    # one grid for both trees: no step over several intervals, which older trees cannot read
    options = dataclasses.replace(spec.solver, max_span=1)
    return [int(m) for m in plan_substeps(model, params, t, e, options).substeps.tolist()]


def weights(grid):
    """The weights ``w`` (0.5 to 1.5, one per recorded point) of ``sum(w * stress)``."""
    import torch

    return torch.linspace(0.5, 1.5, grid.recorded.numel(), dtype=torch.float64)[:, None]


def one_gradient(spec, model, params, grid, w, options, integrate=None):
    """One gradient evaluation: forward solve and chunked adjoint of ``sum(w * stress)`` at
    the recorded points; returns the stress and the calibrated parameters' gradients.
    ``integrate`` is the tree's solver (default: this tree's; a tree that predates
    ``bayescal.integrate`` passes its own)."""
    p = {k: v.clone().requires_grad_(k in spec.calibrated) for k, v in params.items()}
    solve_recorded = None
    if integrate is None:
        try:
            from bayescal.integrate import solve_recorded
        except ImportError:  # a tree from before steps that span several recorded intervals
            from bayescal.integrate import integrate
    if solve_recorded is not None:
        states, _, report = solve_recorded(model, p, grid, options)
    else:  # every recorded point ends a step
        states, report = integrate(model, p, grid, options)
        states = states[grid.recorded]
    stress = model.stress(states)
    (w * stress).sum().backward()
    assert report.n_failed == 0, "a specimen failed to integrate"
    return stress.detach(), {k: p[k].grad for k in spec.calibrated}


def worker(case: dict) -> dict:
    """Time ``case["repeats"]`` gradients with whichever ``bayescal`` is on the path."""
    import torch

    import bayescal
    from bayescal.integrate import refine

    torch.set_num_threads(1)
    spec, model, params, t, e = problem(case["model"], case["specimens"])
    grid = refine(t, e, torch.tensor(case["substeps"]))
    w = weights(grid)
    one_gradient(spec, model, params, grid, w, spec.solver)
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        stress, grad = one_gradient(spec, model, params, grid, w, spec.solver)
        times.append(time.perf_counter() - start)
    grad = {k: g.tolist() for k, g in grad.items()}
    return {"times": times, "gradient": grad, "stress": stress.flatten().tolist(),
            "steps": grid.n_steps - 1, "package": str(Path(bayescal.__file__).parent)}


def extract(revision: str, into: Path) -> Path:
    """``bayescal/`` of ``revision`` under ``into``."""
    archive = subprocess.run(["git", "archive", revision, "bayescal"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_in_tree(script: str, tree: Path, case: dict, folder: Path, what: str) -> dict:
    """``script --worker CASE`` in a fresh process that imports ``tree``'s ``bayescal``, one
    torch thread, the case in a file under ``folder`` (its paths are too long for a command
    line); the worker's last line of output as JSON. A failed worker ends the benchmark with
    ``what`` and its error."""
    path = folder / "case.json"
    path.write_text(json.dumps(case))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, script, "--worker", str(path)], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{what} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_worker(tree: Path, case: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(old: dict, new: dict) -> tuple[float, float]:
    """Largest relative gradient difference and largest stress difference (MPa)."""
    rel = 0.0
    for k in new["gradient"]:
        for a, b in zip(old["gradient"][k], new["gradient"][k]):
            rel = max(rel, abs(a - b) / max(abs(a), abs(b), 1e-300))
    stress = max(abs(a - b) for a, b in zip(old["stress"], new["stress"]))
    return rel, stress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare against")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--specimens", nargs="+", type=int, default=[12])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "gradient.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = []
    header = (f"{'model':<13} {'specimens':>9} {'steps':>6} {'baseline s':>10} {'current s':>10} "
              f"{'ratio':>6} {'(range)':>13} {'grad rel diff':>13} {'stress diff MPa':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": extract(args.baseline, Path(tmp)), "current": ROOT}
        print(f"baseline {args.baseline} against the current tree ({ROOT}); {args.rounds} "
              f"rounds of {args.repeats} gradients per tree, best times\n")
        print(header)
        for name in args.models:
            for specimens in args.specimens:
                case = {"model": name, "specimens": specimens,
                        "substeps": plan(name, specimens), "repeats": args.repeats}
                runs = {"baseline": [], "current": []}
                for r in range(args.rounds):
                    order = ("baseline", "current") if r % 2 == 0 else ("current", "baseline")
                    for which in order:
                        runs[which].append(run_worker(trees[which], case))
                best = {k: min(min(run["times"]) for run in v) for k, v in runs.items()}
                ratios = [min(o["times"]) / min(n["times"])
                          for o, n in zip(runs["baseline"], runs["current"])]
                grad_rel, stress_diff = compare(runs["baseline"][0], runs["current"][0])
                row = {"model": name, "specimens": specimens, "steps": runs["current"][0]["steps"],
                       "baseline_s": best["baseline"], "current_s": best["current"],
                       "ratio_median": statistics.median(ratios), "ratios": ratios,
                       "gradient_max_rel_diff": grad_rel, "stress_max_diff_mpa": stress_diff,
                       "times": {k: [run["times"] for run in v] for k, v in runs.items()}}
                rows.append(row)
                print(f"{name:<13} {specimens:>9} {row['steps']:>6} {best['baseline']:>10.4f} "
                      f"{best['current']:>10.4f} {row['ratio_median']:>5.2f}x "
                      f"{f'({min(ratios):.2f}-{max(ratios):.2f})':>13} {grad_rel:>13.1e} "
                      f"{stress_diff:>15.1e}", flush=True)
    write_results(args.out, args.baseline, rounds=args.rounds, repeats=args.repeats, rows=rows)


def write_results(out: Path, baseline: str, **fields) -> None:
    """``fields`` as JSON at ``out``, with the machine, the baseline and this tree's commit."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   "1 thread",
        "baseline": baseline,
        "current": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                  capture_output=True, text=True).stdout.strip(),
        **fields}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
