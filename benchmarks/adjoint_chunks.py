"""Benchmark: the time of one gradient evaluation against the adjoint's chunk length.

The forward solve's Newton chunks follow the batch (``chunk_steps``; ``benchmarks/chunks.py``
chose them). The adjoint needs no Newton iterations, so its chunks can be longer: each is one
residual evaluation, one vector-Jacobian product and one block substitution whatever its
length, and fewer chunks cost fewer torch calls. This script times that choice.

The problem is ``benchmarks/gradient.py``'s: for each built-in model's shipped card,
``--batches`` specimens drawn from the card's prior population (seed 0) on the informative
load path, on the grid this tree plans at the card's tolerance; one gradient is the forward
solve plus the chunked adjoint of ``sum(w * stress)``. For each model and batch, the adjoint's
chunk length takes each of ``newton`` (the Newton chunks' length, ``chunk_steps(batch)``: how
bayescal solved the adjoint before), the lengths in ``--lengths``, ``whole`` (one chunk) and
``auto`` (``adjoint_chunk_steps``, the default), taking turns ``--rounds`` times in one
process (one torch thread) so that a load change on a shared machine hits them all. Reported:
each setting's best time, the fastest setting, ``newton/auto`` (the gain of the default over
the previous behaviour) and ``auto/fastest``; the gradients of all settings agree to rounding
(the largest relative difference from ``newton`` is reported).

Usage::

    PYTHONPATH=. python benchmarks/adjoint_chunks.py                  # ~3.5 min on 2 cores
    PYTHONPATH=. python benchmarks/adjoint_chunks.py --models voce-jc --batches 1 64

Writes ``benchmarks/results/adjoint_chunks.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chunks import time_in_turns, write_rows  # noqa: E402
from gradient import MODELS, RESULTS, one_gradient, plan, problem, weights  # noqa: E402

from bayescal.integrate import adjoint_chunk_steps, chunk_steps, refine  # noqa: E402

#: An adjoint chunk longer than any grid here: the whole trajectory in one chunk.
WHOLE = 10**6


def settings(batch: int, lengths: list[int]) -> dict[str, int]:
    """The adjoint chunk lengths timed for ``batch`` paths, by label."""
    newton = chunk_steps(batch)
    return {"newton": newton, **{str(n): n for n in lengths}, "whole": WHOLE,
            "auto": adjoint_chunk_steps(batch, newton)}


def measure(name: str, batch: int, lengths: list[int], rounds: int) -> dict:
    """Best gradient time per adjoint chunk setting, and the gradients' largest relative
    difference from the Newton chunks' adjoint."""
    spec, model, params, t, e = problem(name, batch)
    grid = refine(t, e, torch.tensor(plan(name, batch)))
    w = weights(grid)
    labels = settings(batch, lengths)

    def gradient(label: str) -> torch.Tensor:
        options = replace(spec.solver, adjoint_chunk=labels[label])
        _, grad = one_gradient(spec, model, params, grid, w, options)
        return torch.cat([g.flatten() for g in grad.values()])

    best, spread = time_in_turns(gradient, list(labels), rounds)  # "newton" first
    fastest = min(best, key=best.get)
    return {"model": name, "batch": batch, "steps": grid.n_steps - 1,
            "lengths": labels, "best_s": best, "fastest": fastest,
            "newton_over_auto": best["newton"] / best["auto"],
            "auto_over_fastest": best["auto"] / best[fastest],
            "gradient_max_rel_diff": spread}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 12, 64, 256, 1024])
    parser.add_argument("--lengths", nargs="+", type=int, default=[40, 80, 160])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "adjoint_chunks.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    labels = list(settings(1, args.lengths))
    print(f"best seconds per gradient (forward + adjoint) by the adjoint's chunk length, "
          f"{args.rounds} rounds, 1 thread\n")
    head = "".join(f"{label:>9}" for label in labels)
    print(f"{'model':13s}{'batch':>6}{'steps':>6}{head}  newton/auto  auto/fastest  "
          f"auto steps  grad rel diff")
    rows = []
    for name in args.models:
        for batch in args.batches:
            row = measure(name, batch, args.lengths, args.rounds)
            rows.append(row)
            cells = "".join(f"{row['best_s'][label]:9.4f}" for label in labels)
            print(f"{name:13s}{batch:6d}{row['steps']:6d}{cells}  "
                  f"{row['newton_over_auto']:11.2f}  {row['auto_over_fastest']:12.2f}  "
                  f"{row['lengths']['auto']:10d}  {row['gradient_max_rel_diff']:13.1e}",
                  flush=True)
    write_rows(args.out, args.rounds, rows)


if __name__ == "__main__":
    main()
