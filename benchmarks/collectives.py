"""Benchmark: the latency of the reductions a fit makes over ranks, gloo on localhost.

A fit on several ranks reduces small tensors (a log density, a gradient of a few hundred
values, a solve report) about ten times a Newton iteration. This script times, between
``--workers`` local processes (one thread each), torch.distributed's ``all_reduce`` of
float64 tensors of several sizes against :func:`bayescal.distributed.gathered_reduction`
(the single-tensor all-gather and a sum in rank order), which
:class:`bayescal.distributed.Communicator` uses for tensors of 2 to ``GATHER_ELEMENTS``
elements in all.

Usage::

    PYTHONPATH=. python benchmarks/collectives.py            # ~20 s

Prints a table and writes ``benchmarks/results/collectives.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SIZES = (1, 8, 64, 1000, 100_000)


def _best_of(fn, repeats: int, rounds: int = 3) -> float:
    """Best mean time of ``repeats`` calls over ``rounds`` rounds, after a warm-up."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def _rank(rank: int, world: int, port: int, repeats: int, queue) -> None:
    from bayescal.distributed import gathered_reduction

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for size in SIZES:
        x = torch.zeros(size, dtype=torch.float64)
        reduce_s = _best_of(lambda: dist.all_reduce(x), repeats)
        gather_s = _best_of(lambda: gathered_reduction(x, dist.ReduceOp.SUM, world), repeats)
        rows.append({"elements": size, "all_reduce_us": 1e6 * reduce_s,
                     "gather_and_add_us": 1e6 * gather_s})
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "collectives.json")
    args = parser.parse_args()
    from bayescal.workers import free_port

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank, args=(r, args.workers, port, args.repeats, queue))
             for r in range(args.workers)]
    for proc in procs:
        proc.start()
    rows = queue.get()
    for proc in procs:
        proc.join()
    print(f"{'elements':>9} {'all_reduce us':>13} {'gather+add us':>13} {'ratio':>6}")
    for row in rows:
        print(f"{row['elements']:>9} {row['all_reduce_us']:>13.0f} "
              f"{row['gather_and_add_us']:>13.0f} "
              f"{row['all_reduce_us'] / row['gather_and_add_us']:>6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   "gloo on localhost, 1 thread per rank",
        "workers": args.workers, "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
