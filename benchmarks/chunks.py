"""Benchmark: the time of one gradient evaluation against the chunk length and the batch.

The problem is ``benchmarks/gradient.py``'s: for each built-in model's shipped card,
``--batches`` specimens drawn from the card's prior population (seed 0) on the informative
load path, on the grid this tree plans at the card's tolerance; one gradient is the forward
solve plus the chunked adjoint of ``sum(w * stress)``. For each model and batch, every
``--chunks`` length is timed in one process (one torch thread), the lengths taking turns
``--rounds`` times so that a load change on a shared machine hits them all; reported is
each length's best time, the fastest length, and the length that ``chunk_steps`` (the
default without a card's ``n_chunk``) picks with its time relative to the fastest and to
chunks of 20 steps (the cards' setting before it). The gradients of all lengths agree to
the Newton tolerance: the largest relative difference from the first length is reported.

Usage::

    PYTHONPATH=. python benchmarks/chunks.py                  # ~10 min on 2 cores
    PYTHONPATH=. python benchmarks/chunks.py --models voce-jc --batches 256 1024

Writes ``benchmarks/results/chunks.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradient import MODELS, RESULTS, one_gradient, plan, problem, weights  # noqa: E402

from bayescal.integrate import chunk_steps, refine  # noqa: E402


def time_in_turns(gradient, settings: list, rounds: int) -> tuple[dict, float]:
    """Best time of ``gradient(setting)`` (a flat gradient) per setting, the settings taking
    turns ``rounds`` times (the order reversed every other round) after one warm-up each;
    and the gradients' largest relative difference from the first setting's."""
    reference = gradient(settings[0])
    spread = 0.0
    for setting in settings:
        g = gradient(setting)  # warm-up, and the gradient's agreement
        spread = max(spread, float(((g - reference).abs()
                                    / reference.abs().clamp_min(1e-300)).max()))
    best = {setting: float("inf") for setting in settings}
    for r in range(rounds):
        for setting in (settings if r % 2 == 0 else settings[::-1]):
            start = time.perf_counter()
            gradient(setting)
            best[setting] = min(best[setting], time.perf_counter() - start)
    return best, spread


def measure(name: str, batch: int, chunks: list[int], rounds: int) -> dict:
    """Best gradient time per chunk length, and the gradients' largest relative spread."""
    spec, model, params, t, e = problem(name, batch)
    grid = refine(t, e, torch.tensor(plan(name, batch)))
    w = weights(grid)

    def gradient(n_chunk: int) -> torch.Tensor:
        _, grad = one_gradient(spec, model, params, grid, w, replace(spec.solver, n_chunk=n_chunk))
        return torch.cat([g.flatten() for g in grad.values()])

    best, spread = time_in_turns(gradient, chunks, rounds)
    return {"model": name, "batch": batch, "steps": grid.n_steps - 1,
            "best_s": {str(n): s for n, s in best.items()}, "gradient_max_rel_diff": spread}


def write_rows(out: Path, rounds: int, rows: list[dict]) -> None:
    """``rows`` as JSON at ``out``, with the machine and the number of rounds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
        "rounds": rounds, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[12, 64, 256, 1024])
    parser.add_argument("--chunks", nargs="+", type=int, default=[3, 5, 10, 20, 40])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "chunks.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if 20 not in args.chunks:
        parser.error("--chunks must include 20 (the reference length)")
    rows = []
    head = "".join(f"{f'n={n}':>9}" for n in args.chunks)
    print(f"best seconds per gradient (forward + adjoint), {args.rounds} rounds, 1 thread\n")
    print(f"{'model':13s}{'batch':>6}{'steps':>6}{head}  fastest  auto  auto/fastest  20/auto")
    for name in args.models:
        for batch in args.batches:
            row = measure(name, batch, args.chunks, args.rounds)
            best = {int(n): s for n, s in row["best_s"].items()}
            fastest = min(best, key=best.get)
            auto = chunk_steps(batch)
            auto_s = best.get(auto, float("nan"))
            row.update(fastest=fastest, automatic=auto,
                       automatic_over_fastest=auto_s / best[fastest],
                       twenty_over_automatic=best[20] / auto_s)
            rows.append(row)
            cells = "".join(f"{best[n]:9.4f}" for n in args.chunks)
            print(f"{name:13s}{batch:6d}{row['steps']:6d}{cells}  {fastest:7d}  {auto:4d}  "
                  f"{row['automatic_over_fastest']:12.2f}  {row['twenty_over_automatic']:7.2f}",
                  flush=True)
    write_rows(args.out, args.rounds, rows)


if __name__ == "__main__":
    main()
