"""Benchmark: the MAP fit of this tree against a baseline commit's, side by side in one run.

A change to the MAP's Newton iteration (its line search, its Hessian, its stopping rule)
changes the path it takes, and on these problems that path is sensitive to the last bit
(benchmarks/README.md, ``map_start.py``): one fit per tree says little. This script fits
several problems with both trees, each fit in a fresh process (one torch thread), the trees
alternating over ``--rounds`` rounds with the order swapped every round:

* ``scale.py``'s synthetic problem (the informative path, 2 MPa noise, data seed 0) with the
  perzyna-voce card for each of ``--specimens``, and with the voce-jc card for 64;
* the 304L set (64 specimens, the voce-jc card), where ``../shared/realdata`` has it
  (imported once, by this tree).

Per fit: the wall time of ``fit(..., method="map")`` (grid planning, the Newton iteration,
the Hessian at the MAP, the integration check and the output), Newton iterations, solves
(calls of ``Hierarchy.solve_stress``) and the log joint at the last iterate. Per problem:
the time ratio baseline / this tree (median over rounds) and the largest relative
difference of the two trees' MAP values.

Usage::

    PYTHONPATH=. python benchmarks/map_trees.py --baseline 7aff064          # ~15 min
    PYTHONPATH=. python benchmarks/map_trees.py --specimens 64 --no-voce-jc --rounds 1

Writes ``benchmarks/results/map_trees.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradient import extract, run_in_tree  # noqa: E402
from scale import LOAD, ROOT  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "realdata" / "matcal_304L_rate" / "small_tension"


def worker(case: dict) -> dict:
    """One MAP fit with the ``bayescal`` on ``sys.path`` (this tree's or the baseline's)."""
    import warnings

    import torch

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    import bayescal.hierarchy as hierarchy
    from bayescal.card import load_card
    from bayescal.errors import BayescalWarning
    from bayescal.fit import fit

    spec = load_card(Path(case["card"]))
    if case["data"] is not None:
        from bayescal.data import read_experiments
        experiments = read_experiments(case["data"])
    else:
        from bayescal.synthetic import read_simulation_load, simulate_experiments
        experiments = simulate_experiments(spec, read_simulation_load(LOAD, case["specimens"]),
                                           seed=0, noise_sd=2.0).experiments
    solves = [0]
    solve_stress = hierarchy.Hierarchy.solve_stress

    def counted(self, *args, **kwargs):
        solves[0] += 1
        return solve_stress(self, *args, **kwargs)

    hierarchy.Hierarchy.solve_stress = counted
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BayescalWarning)
        idata = fit(spec, experiments, method="map", draws=10, progress=False)
    seconds = time.perf_counter() - start
    log_joint = [float(x) for x in
                 torch.as_tensor(idata.posterior.attrs["log_joint_map"]).reshape(-1)]
    values = {name: [float(x) for x in idata.posterior[name].mean(("chain", "draw")).values
                     .reshape(-1)] for name in idata.posterior.data_vars}
    return {"fit_s": seconds, "iterations": len(log_joint), "solves": solves[0],
            "log_joint": log_joint[-1], "values": values}


def run_worker(tree: Path, case: dict, folder: Path) -> dict:
    """:func:`worker` in a fresh process that imports ``tree``'s ``bayescal``."""
    return run_in_tree(__file__, tree, case, folder,
                       f"the {case['tree']} worker ({case['name']})")


def largest_difference(a: dict, b: dict) -> float:
    """Largest relative difference between two fits' MAP values (``method="map"``: every
    draw is the MAP)."""
    return max(abs(x - y) / max(abs(x), abs(y), 1e-300)
               for name in a for x, y in zip(a[name], b[name]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", default="7aff064", help="git revision to compare against")
    parser.add_argument("--specimens", nargs="+", type=int, default=[32, 64, 128],
                        help="synthetic perzyna-voce problems")
    parser.add_argument("--no-voce-jc", action="store_true",
                        help="skip the synthetic voce-jc problem (64 specimens)")
    parser.add_argument("--data", type=Path, default=DATA, help="the 304L small_tension folder")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "map_trees.json")
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker.read_text()))))
        return
    models = ROOT / "models"
    problems = [{"name": f"perzyna-voce {n}", "card": str(models / "perzyna-voce.toml"),
                 "specimens": n, "data": None} for n in args.specimens]
    if not args.no_voce_jc:
        problems.append({"name": "voce-jc 64", "card": str(models / "voce-jc.toml"),
                         "specimens": 64, "data": None})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trees = {"baseline": extract(args.baseline, folder / "baseline"), "current": ROOT}
        if args.data.is_dir():
            csv = folder / "304L.csv"
            subprocess.run([sys.executable, "-m", "bayescal", "import", "matcal", str(args.data),
                            "--out", str(csv)], cwd=ROOT, check=True, capture_output=True)
            problems.append({"name": "304L (voce-jc)", "card": str(models / "voce-jc.toml"),
                             "specimens": 64, "data": str(csv)})
        print(f"{'problem':>16} {'round':>5} {'tree':>8} {'fit s':>7} {'iterations':>10} "
              f"{'solves':>6} {'log joint':>14}", flush=True)
        for problem in problems:
            for round_ in range(args.rounds):
                order = ["baseline", "current"][::1 if round_ % 2 == 0 else -1]
                for tree in order:
                    result = run_worker(trees[tree], {**problem, "tree": tree}, folder)
                    rows.append({**problem, "round": round_, "tree": tree, **result})
                    print(f"{problem['name']:>16} {round_:>5} {tree:>8} {result['fit_s']:>7.2f} "
                          f"{result['iterations']:>10} {result['solves']:>6} "
                          f"{result['log_joint']:>14.6f}", flush=True)
    print(f"\n{'problem':>16} {'baseline/current':>16} {'range':>11} {'largest rel diff':>16}")
    summary = []
    for problem in problems:
        mine = [r for r in rows if r["name"] == problem["name"]]
        ratios = [next(r for r in mine if r["round"] == k and r["tree"] == "baseline")["fit_s"]
                  / next(r for r in mine if r["round"] == k and r["tree"] == "current")["fit_s"]
                  for k in range(args.rounds)]
        difference = largest_difference(mine[0]["values"], mine[1]["values"])
        summary.append({"problem": problem["name"], "ratio_median": statistics.median(ratios),
                        "ratios": ratios, "largest_relative_difference": difference})
        print(f"{problem['name']:>16} {statistics.median(ratios):>15.2f}x "
              f"{min(ratios):>5.2f}-{max(ratios):<5.2f} {difference:>16.2e}")
    args.out.write_text(json.dumps({
        "commit": commit, "baseline": args.baseline, "rounds": args.rounds,
        "rows": [{k: v for k, v in r.items() if k != "values"} for r in rows],
        "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
