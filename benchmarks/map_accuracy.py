"""What the integration error does to a fit: MAP on held-out data at three solver settings.

Data: 12 perzyna-voce specimens drawn from the shipped card's prior population (seed 101,
which no test uses) on ``docs/examples/informative-load.csv``, simulated at a tolerance of
1e-3 MPa (far below the noise) with Gaussian noise of sd 2.0 MPa.

Fits (``bayescal.fit.fit``, method map, seed 0), the card's solver settings replaced by:

* ``default``: radau-iia, steps planned from tolerance 0.05 MPa;
* ``euler 4/16``: backward Euler, 4 sub-steps (16 after a change of strain rate), the old
  default;
* ``euler 16/64``: backward Euler, 16/64.

Reported: the fitted noise sd against the true 2.0, each population mean against the
specimens' sample mean, the estimated integration error at the MAP, and the wall time of
the fit (planning included). Usage::

    PYTHONPATH=. python benchmarks/map_accuracy.py      # about 4 min on 2 cores

Writes ``benchmarks/results/map_accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from bayescal.card import load_card
from bayescal.fit import fit
from bayescal.integrate import SolverOptions
from bayescal.synthetic import read_simulation_load, simulate_experiments

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": dict(),
    "euler 4/16": dict(scheme="backward-euler", substeps=4, transient_substeps=16),
    "euler 16/64": dict(scheme="backward-euler", substeps=16, transient_substeps=64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "map_accuracy.json")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    spec = load_card(ROOT / "models" / "perzyna-voce.toml")
    load = read_simulation_load(ROOT / "docs" / "examples" / "informative-load.csv", 12)
    truth_spec = replace(spec, solver=replace(spec.solver, tolerance=1e-3))
    data = simulate_experiments(truth_spec, load, seed=101, noise_sd=2.0)
    sample_means = {k: float(v.mean()) for k, v in data.parameters.items()}
    rows = []
    print(f"{'setting':<12} {'noise sd':>9} {'error %':>8} " +
          " ".join(f"{k + ' %':>9}" for k in spec.varying) +
          f" {'int. err max':>12} {'steps':>6} {'time s':>7}")
    for label, change in SETTINGS.items():
        options = SolverOptions(**{**spec.solver.__dict__, **change})
        start = time.perf_counter()
        idata = fit(replace(spec, solver=options), data.experiments, method="map",
                    progress=False)
        seconds = time.perf_counter() - start
        post = idata.posterior
        noise = float(post["noise_sd"].mean())
        pop = {k: float(post[f"{k}_pop_mean"].mean()) for k in spec.varying}
        rel = {k: 100 * (pop[k] / sample_means[k] - 1) for k in spec.varying}
        row = {"setting": label, "noise_sd": noise, "noise_error_pct": 100 * (noise / 2.0 - 1),
               "pop_mean": pop, "pop_mean_error_pct": rel,
               "integration_error_max": float(post.attrs["integration_error_max"]),
               "integration_steps": int(post.attrs["integration_steps"]), "seconds": seconds}
        rows.append(row)
        print(f"{label:<12} {noise:>9.3f} {row['noise_error_pct']:>8.1f} " +
              " ".join(f"{rel[k]:>9.2f}" for k in spec.varying) +
              f" {row['integration_error_max']:>12.3g} {row['integration_steps']:>6} "
              f"{seconds:>7.1f}", flush=True)
    base = next(r for r in rows if r["setting"] == "default")["seconds"]
    for r in rows:
        r["time_vs_default"] = r["seconds"] / base
    print("time relative to the default: " +
          ", ".join(f"{r['setting']} {r['time_vs_default']:.2f}x" for r in rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sample_means": sample_means, "rows": rows}, indent=1)
                        + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
