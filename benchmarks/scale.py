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

Writes ``benchmarks/results/scale.json`` (``--out``).

Workers (``--workers 1 2``, data parallelism over specimens, docs/scaling.md): the same
measures on 1 and 2 ranks (local processes over gloo, one thread each), through the path a
fit takes (the gradient of the model's log joint at its starting point, and the MAP fit):

* **strong scaling**: the same ``n`` specimens (each of ``--specimens``) on 1 and on K
  ranks; parallel efficiency ``t_1 / (K t_K)``;
* **weak scaling**: ``--per-worker`` specimens per rank (``K * per_worker`` in all);
  efficiency ``t_1 / t_K``.

Each MAP fit also reports its Newton iterations and its time per iteration (the fit's wall
time over them, planning and predictive included): a larger problem can take more
iterations, which is the problem's scaling, not the ranks'; the per-iteration efficiency
separates the two.

``--fit-repeats R`` takes the best of R fits per case (the machine's spread between two
runs of one fit is as large as the ranks' gain).

Usage::

    PYTHONPATH=. python benchmarks/scale.py --workers 1 2 --specimens 16 32 --per-worker 8

writes ``benchmarks/results/scale_workers.json`` (``--workers-out``) and prints the table.
Efficiency below 1 comes from the work every rank repeats (grid planning, the integration
check, the Newton linear algebra) and from the all-reduces.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from pathlib import Path

import torch

from bayescal.card import load_card
from bayescal.errors import BayescalWarning
from bayescal.fit import fit
from bayescal.hierarchy import Hierarchy
from bayescal.inference.packing import Packing, initial_values
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


def rank_times(card: Path, n: int, repeats: int, fits: int, comm=None) -> dict:
    """On this rank (``comm``; None: one process): best time of the gradient of the
    model's log joint at its starting point, and best of ``fits`` MAP fits (none if 0);
    the ranks start each timing together. Best of several, because this machine's
    run-to-run spread (15-35 % between two runs of one fit) is as large as the effect
    measured."""
    spec = load_card(card)
    synthetic = simulate_experiments(spec, read_simulation_load(LOAD, n), seed=0,
                                     noise_sd=NOISE)
    h = Hierarchy(spec, synthetic.experiments, comm=comm)
    packing = Packing(h, initial_values(h))
    best = math.inf
    for i in range(repeats + 1):
        u = packing.u0.clone()[None].requires_grad_(True)
        if comm is not None:
            comm.barrier()
        start = time.perf_counter()
        packing.log_joint(u).sum().backward()
        if i:
            best = min(best, time.perf_counter() - start)
    fit_times, iterations = [], 0
    for _ in range(fits):
        if comm is not None:
            comm.barrier()
        start = time.perf_counter()
        with warnings.catch_warnings():  # the fit's advice is not the benchmark's concern
            warnings.simplefilter("ignore", BayescalWarning)
            idata = fit(spec, synthetic.experiments, method="map", progress=False, comm=comm)
        fit_times.append(time.perf_counter() - start)
        iterations = len(idata.posterior.attrs["log_joint_map"])
    fit_s = min(fit_times, default=math.nan)
    return {"gradient_s": best, "map_fit_s": fit_s, "map_iterations": iterations,
            "map_iteration_s": fit_s / iterations if iterations else math.nan}


def _rank(rank: int, world: int, port: int, card: Path, n: int, repeats: int, fits: int,
          queue) -> None:
    import os

    from bayescal.distributed import from_environment, shutdown

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    comm = from_environment()
    times = rank_times(card, n, repeats, fits, comm)
    if comm.writer:
        queue.put(times)
    shutdown(comm)


def on_workers(card: Path, n: int, workers: int, repeats: int, fits: int) -> dict:
    """:func:`rank_times` of rank 0 with ``n`` specimens on ``workers`` local ranks."""
    if workers == 1:
        return rank_times(card, n, repeats, fits)
    import torch.multiprocessing as mp

    from bayescal.workers import free_port

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank, args=(r, workers, port, card, n, repeats, fits,
                                                 queue)) for r in range(workers)]
    for proc in procs:
        proc.start()
    times = queue.get()
    for proc in procs:
        proc.join()
    return times


def scaling(args) -> list[dict]:
    """Strong and weak scaling rows over ``args.workers`` (see the module docstring)."""
    rows = []
    cases = [("strong", n, k) for n in args.specimens for k in args.workers]
    cases += [("weak", args.per_worker * k, k) for k in args.workers]
    base: dict[tuple[str, int], dict] = {}
    print(f"{'scaling':>7} {'specimens':>9} {'workers':>7} {'gradient s':>10} {'eff':>5} "
          f"{'MAP fit s':>9} {'eff':>5} {'iterations':>10} {'s/iteration':>11} {'eff':>5}")
    for kind, n, k in cases:
        if k > n:
            continue
        times = on_workers(args.card, n, k, args.repeats,
                           args.fit_repeats if n <= args.fit_max else 0)
        key = (kind, n if kind == "strong" else args.per_worker)
        if k == 1:
            base[key] = times
        ref = base.get(key)
        row = {"scaling": kind, "specimens": n, "workers": k, **times}
        for name in ("gradient_s", "map_fit_s", "map_iteration_s"):
            ideal = math.nan if ref is None else (
                ref[name] / k if kind == "strong" else ref[name])
            row[name.replace("_s", "_efficiency")] = ideal / times[name]
        rows.append(row)
        print(f"{kind:>7} {n:>9} {k:>7} {times['gradient_s']:>10.4f} "
              f"{row['gradient_efficiency']:>5.2f} {times['map_fit_s']:>9.1f} "
              f"{row['map_fit_efficiency']:>5.2f} {times['map_iterations']:>10d} "
              f"{times['map_iteration_s']:>11.3f} {row['map_iteration_efficiency']:>5.2f}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--card", type=Path, default=ROOT / "models" / "perzyna-voce.toml")
    parser.add_argument("--specimens", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--fit-max", type=int, default=64,
                        help="fit (MAP) only up to this many specimens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fit-repeats", type=int, default=1,
                        help="with --workers: best of this many MAP fits per case (default: 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--workers", nargs="+", type=int,
                        help="measure strong and weak scaling on these numbers of local ranks "
                             "(e.g. 1 2) instead of the single-process table")
    parser.add_argument("--per-worker", type=int, default=8,
                        help="specimens per rank of the weak-scaling rows (default: 8)")
    parser.add_argument("--workers-out", type=Path, default=RESULTS / "scale_workers.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.workers:
        rows = scaling(args)
        args.workers_out.parent.mkdir(parents=True, exist_ok=True)
        args.workers_out.write_text(json.dumps({
            "machine": f"{platform.processor() or platform.machine()}, torch "
                       f"{torch.__version__}, 1 thread per rank, gloo",
            "card": str(args.card), "noise_mpa": NOISE, "repeats": args.repeats,
            "fit_repeats": args.fit_repeats,
            "per_worker": args.per_worker, "rows": rows}, indent=1) + "\n")
        print(f"\nwrote {args.workers_out}")
        return
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
