"""Benchmark: time per gradient against the stress error (work-precision), this tree against
the code path of issue 12's filing, side by side in one run.

Issue 12 asks for "at least 2x less time per gradient evaluation at the same accuracy on the
benchmark problem, measured in one run against today's code path". The benchmark problem is
the issue's: 12 specimens on the informative path (30 recorded points a segment; 661
integration steps then). Today's code path, when the issue was filed (``b78c5ca``), was
backward Euler with sub-steps fixed by hand (4 a recorded interval, 16 where the strain
rate changes: the cards' setting). :mod:`benchmarks.gradient` compares both trees on one
grid, which isolates the overhead per step; this script compares them at equal accuracy,
where the scheme and the choice of steps count too (the work-precision view of Diffrax's
benchmarks).

For each built-in model (the current tree's card, 12 specimens drawn from its prior
population, seed 0, the same values for both trees):

* **baseline** (``--baseline``, default ``b78c5ca``; its ``bayescal/`` extracted from git):
  backward Euler at ``m`` sub-steps a recorded interval and ``4 m`` where the rate changes,
  for each ``m`` of ``--substeps`` (4 is its default);
* **current** (this tree): the card's scheme (Radau IIA) on the grid planned at each
  ``--tolerances`` value (the planning, once per fit, not timed).

One gradient evaluation is the forward solve and the chunked adjoint of ``sum(w * stress)``
at the recorded points (``w`` from 0.5 to 1.5) with respect to every calibrated parameter,
with the card's Newton tolerances and chunk length 20. The error is the recorded stress
against scipy's Radau at rtol = atol = 1e-10 (:mod:`bayescal.reference`, which shares no
code with either tree): rms and largest over all points and specimens. Each tree and model
runs in a fresh process (one torch thread, one warm-up, ``--repeats`` timed gradients per
setting); the trees alternate over ``--rounds`` rounds, the order swapped every round.

Reported: per setting the integration steps, best time and errors; per model the
**ratio at equal accuracy**: each baseline setting against the current tree's fastest
setting whose largest and rms errors are both no larger, with the ratio of the best times within each round (median and range over
rounds).

Usage::

    PYTHONPATH=. python benchmarks/gradient_precision.py              # ~4 min on 2 cores

Writes ``benchmarks/results/gradient_precision.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradient import (MODELS, RESULTS, ROOT, extract, one_gradient, problem,  # noqa: E402
                      run_in_tree, weights, write_results)

BASELINE = "b78c5ca"
SPECIMENS = 12
N_CHUNK = 20


def _inputs(case: dict):
    """The case's calibrated names (as a card's ``calibrated``), parameters and path."""
    import types

    import torch

    spec = types.SimpleNamespace(calibrated=tuple(case["calibrated"]))
    params = {k: torch.tensor(v, dtype=torch.float64) for k, v in case["params"].items()}
    t, e = (torch.tensor(case[k], dtype=torch.float64) for k in ("time", "strain"))
    return spec, params, t, e


def baseline_setup(case: dict, setting: int):
    """The baseline tree's gradient (``bayescal.simulate``: backward Euler at ``setting``
    sub-steps, ``4 setting`` where the strain rate changes) as a function, and its steps."""
    import dataclasses

    from bayescal.material import get_model
    from bayescal.simulate import SolverOptions, integrate, refine

    spec, params, t, e = _inputs(case)
    model = get_model(case["model"])
    options = dataclasses.replace(SolverOptions(), n_chunk=N_CHUNK, substeps=setting,
                                  transient_substeps=4 * setting, rtol=case["rtol"],
                                  atol=case["atol"])
    grid = refine(t, e, options)
    w = weights(grid)
    return (lambda: one_gradient(spec, model, params, grid, w, options, integrate)[0],
            grid.n_steps - 1)


def current_setup(case: dict, setting: list[int]):
    """This tree's gradient (the card's scheme on the grid of ``setting``, sub-steps per
    recorded interval) as a function, and its steps."""
    import dataclasses

    import torch
    from bayescal.card import load_card, load_model
    from bayescal.integrate import refine

    spec, params, t, e = _inputs(case)
    card = load_card(ROOT / "models" / f"{case['model']}.toml")
    model = load_model(card)
    options = dataclasses.replace(card.solver, n_chunk=N_CHUNK, rtol=case["rtol"],
                                  atol=case["atol"])
    grid = refine(t, e, torch.tensor(setting))
    w = weights(grid)
    return lambda: one_gradient(spec, model, params, grid, w, options)[0], grid.n_steps - 1


def worker(case: dict) -> dict:
    """Time every setting of ``case`` with whichever ``bayescal`` is on the path: the model,
    options and grid are made once, outside the timed solves."""
    import torch

    torch.set_num_threads(1)
    setup = baseline_setup if case["tree"] == "baseline" else current_setup
    results = []
    for setting in case["settings"]:
        gradient, steps = setup(case, setting)
        stress = gradient()  # warm-up
        times = []
        for _ in range(case["repeats"]):
            start = time.perf_counter()
            gradient()
            times.append(time.perf_counter() - start)
        results.append({"times": times, "steps": steps, "stress": stress.tolist()})
    return {"results": results}


def run_worker(tree: Path, case: dict, folder: Path) -> list[dict]:
    """:func:`worker` in a fresh process that imports ``tree``'s ``bayescal``."""
    return run_in_tree(__file__, tree, case, folder,
                       f"the {case['tree']} worker ({case['model']})")["results"]


def reference_stress(name: str, params: dict, t, e):
    """scipy Radau's stress ``(n_rec, specimens)`` (:func:`bayescal.reference.radau_stress`)."""
    import numpy as np

    from bayescal.reference import radau_stress

    n = t.shape[1]
    return np.stack([radau_stress(name, {k: float(v[j]) for k, v in params.items()},
                                  t[:, j].numpy(), e[:, j].numpy()) for j in range(n)], 1)


def errors(stress, reference) -> tuple[float, float]:
    """rms and largest |stress - reference| (MPa)."""
    import numpy as np

    diff = np.asarray(stress) - reference
    return float(np.sqrt(np.mean(diff ** 2))), float(np.abs(diff).max())


def at_equal_accuracy(name: str, baseline: dict, current: list[dict]) -> dict:
    """The time ratio of the ``baseline`` row to the fastest of the ``current`` rows whose
    rms and largest errors are both no larger (per round: median and all)."""
    matching = [row for row in current
                if row["max_error_mpa"] <= baseline["max_error_mpa"]
                and row["rms_error_mpa"] <= baseline["rms_error_mpa"]]
    if not matching:
        return {"model": name, "baseline": baseline["setting"], "current": None,
                "ratio_median": math.nan, "ratios": []}
    fastest = min(matching, key=lambda row: row["best_s"])
    ratios = [b / c for b, c in zip(baseline["per_round_s"], fastest["per_round_s"])]
    return {"model": name, "baseline": baseline["setting"], "current": fastest["setting"],
            "ratio_median": statistics.median(ratios), "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare against")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--substeps", nargs="+", type=int, default=[4, 8, 16],
                        help="the baseline's sub-steps a recorded interval (4 x where the rate "
                             "changes)")
    parser.add_argument("--tolerances", nargs="+", type=float,
                        default=[2.0, 1.0, 0.5, 0.2, 0.05],
                        help="the current tree's integration tolerances (MPa)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "gradient_precision.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return
    import dataclasses

    from bayescal.integrate import plan_substeps

    rows, summaries = [], []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": extract(args.baseline, Path(tmp)), "current": ROOT}
        print(f"baseline {args.baseline} (backward Euler, sub-steps by hand) against the "
              f"current tree; {SPECIMENS} specimens, informative path; {args.rounds} rounds of "
              f"{args.repeats} gradients per setting, best times\n")
        print(f"{'model':<13} {'tree':<8} {'setting':>10} {'steps':>6} {'best s':>8} "
              f"{'rms MPa':>9} {'max MPa':>9}")
        for name in args.models:
            spec, model, params, t, e = problem(name, SPECIMENS)
            reference = reference_stress(name, params, t, e)
            plans = [plan_substeps(model, params, t, e,
                                   dataclasses.replace(spec.solver, tolerance=tol)
                                   ).substeps.tolist() for tol in args.tolerances]
            common = {"model": name, "params": {k: v.tolist() for k, v in params.items()},
                      "calibrated": sorted(spec.calibrated), "time": t.tolist(),
                      "strain": e.tolist(), "rtol": spec.solver.rtol,
                      "atol": spec.solver.atol, "repeats": args.repeats}
            cases = {"baseline": {**common, "tree": "baseline", "settings": args.substeps},
                     "current": {**common, "tree": "current", "settings": plans}}
            runs = {"baseline": [], "current": []}
            for r in range(args.rounds):
                for which in (("baseline", "current") if r % 2 == 0
                              else ("current", "baseline")):
                    runs[which].append(run_worker(trees[which], cases[which], Path(tmp)))
            labels = {"baseline": [f"m={m}" for m in args.substeps],
                      "current": [f"tol={tol:g}" for tol in args.tolerances]}
            found = {}
            for which in ("baseline", "current"):
                for i, label in enumerate(labels[which]):
                    first = runs[which][0][i]
                    rms, worst = errors(first["stress"], reference)
                    per_round = [min(run[i]["times"]) for run in runs[which]]
                    row = {"model": name, "tree": which, "setting": label,
                           "steps": first["steps"], "best_s": min(per_round),
                           "per_round_s": per_round, "rms_error_mpa": rms,
                           "max_error_mpa": worst}
                    rows.append(row)
                    found[(which, i)] = row
                    print(f"{name:<13} {which:<8} {label:>10} {row['steps']:>6} "
                          f"{row['best_s']:>8.4f} {rms:>9.3g} {worst:>9.3g}", flush=True)
            for i, setting in enumerate(labels["baseline"]):
                summaries.append(at_equal_accuracy(
                    name, found[("baseline", i)],
                    [found[("current", j)] for j in range(len(args.tolerances))]))
    print("\nat equal accuracy: each baseline setting against the current tree's fastest "
          "setting with no larger rms and largest error (m=4: the baseline's default)")
    print(f"{'model':<13} {'baseline':>9} {'current':>9} {'ratio':>6} {'(range)':>13}")
    for s in summaries:
        span = f"({min(s['ratios']):.2f}-{max(s['ratios']):.2f})" if s["ratios"] else "-"
        print(f"{s['model']:<13} {s['baseline']:>9} {str(s['current']):>9} "
              f"{s['ratio_median']:>5.2f}x {span:>13}")
    write_results(args.out, args.baseline, specimens=SPECIMENS, rounds=args.rounds,
                  repeats=args.repeats, rows=rows, at_equal_accuracy=summaries)


if __name__ == "__main__":
    main()
