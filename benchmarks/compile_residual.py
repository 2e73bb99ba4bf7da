"""Benchmark: ``torch.compile`` of the built-in models' residual, eager against compiled.

Issue 12 names ``torch.compile`` of the built-in models' residual and Jacobian as a
candidate for a cheaper gradient, "if it compiles in seconds rather than minutes". This
script compiles the state-dependent part of
:meth:`bayescal.material.StrainControlledResidual.evaluate_raw` (the model's rate and its
Jacobian, the stage residuals and the diagonal blocks; ``dynamic=True``, so that one graph
serves every chunk length and batch) and times one gradient of the scale benchmark's
problem (``scale.py``: specimens from the card's prior population on the informative path,
the data's Gaussian log likelihood, forward solve and chunked adjoint) in the solver,
eager and compiled, each in a fresh process with one thread: the first gradient (the
compilation, forward and backward, included) and the best of ``--repeats`` after it, and
the largest relative difference of the compiled gradient from the eager one.

Usage::

    PYTHONPATH=. python benchmarks/compile_residual.py                 # ~3 min on 2 cores

Writes ``benchmarks/results/compile_residual.json`` (``--out``). Torch keeps compiled
kernels in a cache on disk, which would shorten a later process's first gradient: each
compiled case gets an empty cache of its own (``TORCHINDUCTOR_CACHE_DIR`` in a temporary
folder), so ``first_compiled_s`` is a cold compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CASES = (("perzyna-voce", 64), ("perzyna-voce", 256), ("voce-jc", 64))


def _compiled_evaluate_raw(compile_core: bool):
    """``StrainControlledResidual.evaluate_raw`` with its state-dependent part through
    ``torch.compile`` (or, for the eager case, the same split without it)."""
    import torch

    def core(self, x_full, terms):
        s, n = self.scheme.stages, self.model.n_state
        k = self._constants(x_full)
        stages = x_full[1:].unflatten(-1, (s, n))
        x_prev = x_full[:-1, ..., None, (s - 1) * n:]
        rate, jac = self.model.rate(stages, terms["params"], *terms["temperature"])
        dt = terms["dt"]
        R = stages - x_prev - dt * (k["a"] @ rate) - terms["drive"]
        coupled = k["a_blocks"] * jac.transpose(-3, -2)[..., None, :, :, :]
        diag = k["eye"] - dt * coupled.reshape(*coupled.shape[:-4], s * n, s * n)
        return R.flatten(-2), diag

    run = torch.compile(core, dynamic=True) if compile_core else core

    def evaluate_raw(self, x_full, forces, terms=None):
        terms = self.chunk_terms(forces) if terms is None else terms
        R, diag = run(self, x_full, terms)
        sub = self._constants(x_full)["sub"]
        return R, self.wrapper.wrap_jacobian(diag, sub.expand_as(diag))

    return evaluate_raw


def one_case(card: str, specimens: int, compiled: bool, repeats: int) -> dict:
    """Times of one gradient, eager or compiled (in this process)."""
    import torch

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scale
    from bayescal.card import load_card
    from bayescal.hierarchy import Hierarchy
    from bayescal.material import StrainControlledResidual
    from bayescal.synthetic import read_simulation_load, simulate_experiments

    spec = load_card(ROOT / "models" / f"{card}.toml")
    synthetic = simulate_experiments(spec, read_simulation_load(scale.LOAD, specimens), seed=0,
                                     noise_sd=scale.NOISE)
    h = Hierarchy(spec, synthetic.experiments)
    StrainControlledResidual.evaluate_raw = _compiled_evaluate_raw(compiled)
    observed = torch.nan_to_num(h.experiments.stress.T)

    def gradient():
        values = {k: v.clone().requires_grad_(True) for k, v in synthetic.parameters.items()
                  if k in spec.calibrated}
        stress, _ = h.solve_stress(values)
        loglik = torch.distributions.Normal(stress, scale.NOISE).log_prob(observed)
        torch.where(h.experiments.mask.T, loglik, 0.0).sum().backward()
        return torch.cat([v.grad for v in values.values()])

    start = time.perf_counter()
    grad = gradient()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        gradient()
        best = min(best, time.perf_counter() - start)
    return {"first_s": first, "best_s": best, "gradient": grad.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "compile_residual.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, as JSON
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(one_case(case["card"], case["specimens"], case["compiled"],
                                 args.repeats)))
        return
    rows = []
    print(f"{'card':>13} {'specimens':>9} {'eager s':>8} {'compiled s':>10} {'speed-up':>8} "
          f"{'first compiled s':>16} {'max rel diff':>12}")
    for card, specimens in CASES:
        times = {}
        for compiled in (False, True):
            case = json.dumps({"card": card, "specimens": specimens, "compiled": compiled})
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": cache}
                out = subprocess.run([sys.executable, __file__, "--case", case, "--repeats",
                                      str(args.repeats)], capture_output=True, text=True,
                                     check=True, env=env)
            times[compiled] = json.loads(out.stdout.strip().splitlines()[-1])
        eager, compiled = times[False], times[True]
        diff = max(abs(a - b) / max(abs(a), 1e-300)
                   for a, b in zip(eager["gradient"], compiled["gradient"]))
        row = {"card": card, "specimens": specimens, "eager_s": eager["best_s"],
               "compiled_s": compiled["best_s"], "speedup": eager["best_s"] / compiled["best_s"],
               "first_compiled_s": compiled["first_s"], "first_eager_s": eager["first_s"],
               "max_grad_rel_diff": diff}
        rows.append(row)
        print(f"{card:>13} {specimens:>9} {row['eager_s']:>8.4f} {row['compiled_s']:>10.4f} "
              f"{row['speedup']:>7.2f}x {row['first_compiled_s']:>16.1f} {diff:>12.1e}",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    args.out.write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   "1 thread", "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
