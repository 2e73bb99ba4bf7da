"""Benchmark: the MAP's solves started from the last trajectory, against cold starts.

Each Newton iteration of the MAP (``bayescal.inference.laplace``) solves a batch of points
``hessian_step`` from the iterate (the gradient and Hessian) and a line search. With
``MAPConfig(warm_start=True)`` (the default) Newton starts each of those solves from the
trajectory of the point solved before it (:func:`bayescal.inference.laplace.start_near`);
with ``False`` from the step-extrapolating predictor, as before.

Problem: ``scale.py``'s (``--specimens`` synthetic specimens from the card's prior
population on the informative path, 2 MPa noise, seed 0). For each round, in one process
and one thread, the two settings take turns: ``bayescal.fit.fit(..., method="map")`` end to
end. Printed: the best fit time of each, its Newton iterations and time per iteration, the
final log joint, and the largest relative difference between the two MAPs' parameters.

Usage::

    PYTHONPATH=. python benchmarks/map_start.py                 # 64 specimens, ~3 min
    PYTHONPATH=. python benchmarks/map_start.py --card models/voce-jc.toml --rounds 1

Writes ``benchmarks/results/map_start.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bayescal.card import load_card
from bayescal.errors import BayescalWarning
from bayescal.fit import fit
from bayescal.inference.laplace import MAPConfig
from bayescal.synthetic import read_simulation_load, simulate_experiments

ROOT = Path(__file__).resolve().parents[1]
LOAD = ROOT / "docs" / "examples" / "informative-load.csv"
NOISE = 2.0


def run(spec, experiments, warm_start: bool) -> dict:
    """One MAP fit; its time, Newton iterations, final log joint and parameters."""
    start = time.perf_counter()
    with warnings.catch_warnings():  # the fit's advice is not the benchmark's concern
        warnings.simplefilter("ignore", BayescalWarning)
        idata = fit(spec, experiments, method="map", progress=False, draws=1,
                    map_config=MAPConfig(warm_start=warm_start))
    seconds = time.perf_counter() - start
    posterior = idata.posterior
    log_joint = np.atleast_1d(posterior.attrs["log_joint_map"])
    values = {name: posterior[name].values.ravel() for name in posterior.data_vars}
    return {"seconds": seconds, "iterations": len(log_joint),
            "log_joint": float(log_joint[-1]), "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--card", type=Path, default=ROOT / "models" / "perzyna-voce.toml")
    parser.add_argument("--specimens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results"
                        / "map_start.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = load_card(args.card)
    experiments = simulate_experiments(spec, read_simulation_load(LOAD, args.specimens),
                                       seed=0, noise_sd=NOISE).experiments
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, warm in (("warm", True), ("cold", False)):
            result = run(spec, experiments, warm)
            if result["seconds"] < best.get(name, {"seconds": math.inf})["seconds"]:
                best[name] = result
    warm, cold = best["warm"], best["cold"]
    difference = max(float(np.max(np.abs(warm["values"][k] - cold["values"][k])
                                  / np.maximum(np.abs(cold["values"][k]), 1e-12)))
                     for k in cold["values"])
    print(f"{'start':>5} {'fit s':>7} {'iterations':>10} {'s/iteration':>11} {'log joint':>14}")
    rows = []
    for name, result in (("cold", cold), ("warm", warm)):
        per = result["seconds"] / result["iterations"]
        print(f"{name:>5} {result['seconds']:>7.2f} {result['iterations']:>10d} {per:>11.3f} "
              f"{result['log_joint']:>14.6f}")
        rows.append({"start": name, "fit_s": result["seconds"],
                     "iterations": result["iterations"], "s_per_iteration": per,
                     "log_joint": result["log_joint"]})
    print(f"cold / warm: fit {cold['seconds'] / warm['seconds']:.2f}x, per iteration "
          f"{(cold['seconds'] / cold['iterations']) / (warm['seconds'] / warm['iterations']):.2f}x; "
          f"largest relative difference of the MAPs' parameters {difference:.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
        "card": args.card.name, "specimens": args.specimens, "rounds": args.rounds,
        "rows": rows, "max_relative_difference": difference,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
