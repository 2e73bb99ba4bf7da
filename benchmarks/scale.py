"""Benchmark: time per gradient evaluation and per fit against the number of specimens.

Synthetic data as ``bayescal simulate`` makes them: ``n`` specimens drawn from the card's
prior population (seed 0) on the informative load path (``docs/examples/informative-load.csv``),
2 MPa of measurement noise, for ``n`` in ``--specimens`` (default 8, 16, 32, 64, 128, 256).
For each ``n``, in one process, one torch thread:

* **plan**: building the :class:`~bayescal.hierarchy.Hierarchy`, which plans the integration
  grid over the prior population (once per fit);
* **gradient**: the gradient of the data's Gaussian log-likelihood with respect to every
  calibrated parameter of every specimen, at the specimens' true values: one forward solve
  and the chunked adjoint, through ``Hierarchy.simulate`` (what each MAP, SVI or NUTS step
  pays), without warm start; best of ``--repeats`` after one warm-up;
* **fit**: ``bayescal.fit.fit(..., method="map")`` end to end (plan, MAP, integration check
  at the MAP, predictive), wall time, for ``n`` up to ``--fit-max``.

Usage::

    PYTHONPATH=. python benchmarks/scale.py                        # gradients 8..256, fits to 64
    PYTHONPATH=. python benchmarks/scale.py --specimens 8 16 --fit-max 16

Writes ``benchmarks/results/scale.json`` (``--out``). The columns against the number of
worker processes (issue 12) come with the distributed runs.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from bayescal.card import load_card
from bayescal.fit import fit
from bayescal.hierarchy import Hierarchy
from bayescal.synthetic import read_simulation_load, simulate_experiments

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LOAD = ROOT / "docs" / "examples" / "informative-load.csv"
SIZES = (8, 16, 32, 64, 128, 256)
NOISE = 2.0


def gradient_time(h: Hierarchy, truth: dict[str, torch.Tensor], noise: float,
                  repeats: int) -> float:
    """Best time of one log-likelihood gradient with respect to the calibrated parameters."""
    exp = h.experiments
    observed = torch.nan_to_num(exp.stress.T)
    best = math.inf
    for i in range(repeats + 1):
        values = {k: v.clone().requires_grad_(k in h.spec.calibrated) for k, v in truth.items()
                  if k in h.spec.calibrated}
        start = time.perf_counter()
        stress, _ = h.solve_stress(values)
        loglik = torch.distributions.Normal(stress, noise).log_prob(observed)
        torch.where(exp.mask.T, loglik, 0.0).sum().backward()
        if i:  # the first is a warm-up
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--card", type=Path, default=ROOT / "models" / "perzyna-voce.toml")
    parser.add_argument("--specimens", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--fit-max", type=int, default=64,
                        help="fit (MAP) only up to this many specimens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = load_card(args.card)
    rows = []
    print(f"{'specimens':>9} {'steps':>6} {'plan s':>7} {'gradient s':>10} "
          f"{'per specimen ms':>15} {'MAP fit s':>9}")
    for n in args.specimens:
        synthetic = simulate_experiments(spec, read_simulation_load(LOAD, n), seed=0,
                                         noise_sd=NOISE)
        start = time.perf_counter()
        h = Hierarchy(spec, synthetic.experiments)
        plan_s = time.perf_counter() - start
        grad_s = gradient_time(h, synthetic.parameters, NOISE, args.repeats)
        fit_s = math.nan
        if n <= args.fit_max:
            start = time.perf_counter()
            fit(spec, synthetic.experiments, method="map", progress=False)
            fit_s = time.perf_counter() - start
        row = {"specimens": n, "steps": h.grid.n_steps - 1, "plan_s": plan_s,
               "gradient_s": grad_s, "map_fit_s": fit_s}
        rows.append(row)
        print(f"{n:>9} {row['steps']:>6} {plan_s:>7.2f} {grad_s:>10.4f} "
              f"{1e3 * grad_s / n:>15.2f} {fit_s:>9.1f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   "1 thread",
        "card": str(args.card.relative_to(ROOT)) if args.card.is_relative_to(ROOT)
        else str(args.card),
        "noise_mpa": NOISE, "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
