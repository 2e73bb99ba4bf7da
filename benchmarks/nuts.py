"""NUTS cost and efficiency on the small recovery problem: gradient evaluations per second,
bulk ESS per minute for each population mean and the minutes to 400 bulk ESS of the slowest,
at the defaults (parameterisation chosen from the data) and forced centered or non-centered,
started from the Laplace approximation (``init map``) or from the full-rank SVI guide
(``init svi``).

    PYTHONPATH=. python benchmarks/nuts.py                 # ~30 min on 2 shared cores
    PYTHONPATH=. python benchmarks/nuts.py --runs centered-map --samples 50

The problem is the tests' (tests/test_nuts.py): 5 specimens of ``perzyna-voce`` drawn from a
known population (8 % cv, noise sd 2 MPa), 80 recorded points each on a path with two rates,
a relaxation hold, an unload and a reload; one solver chunk for the whole path. Each run has
``--chains`` chains in parallel processes (one torch thread each). Prints a table and writes
``benchmarks/results/nuts.json`` (``--out``), one record per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

RUNS = {
    "default": {"centered": None, "init": "map"},  # the parameterisation chosen from the data
    "centered-map": {"centered": True, "init": "map"},
    "centered-svi": {"centered": True, "init": "svi"},
    "noncentered-map": {"centered": False, "init": "map"},
}


def run(name: str, chains: int, warmup: int, samples: int, seed: int) -> dict:
    """One NUTS fit; returns its record."""
    import arviz as az
    import numpy as np

    from bayescal.card import load_card
    from bayescal.fit import fit
    from bayescal.inference.nuts import NUTSConfig
    from bayescal.inference.svi import SVIConfig

    from bayescal.testing import CARD, TRUE_MEANS, long_chunks, synthetic

    experiments, truth = synthetic(5, seed=2, points_per_segment=16)
    setting = RUNS[name]
    start = time.perf_counter()
    idata = fit(long_chunks(load_card(CARD)), experiments, method="nuts", seed=seed,
                centered=setting["centered"], config=SVIConfig(guide="mvn", steps=400),
                nuts=NUTSConfig(chains=chains, warmup=warmup, samples=samples,
                                init=setting["init"]), progress=False)
    wall = time.perf_counter() - start
    attrs = idata.posterior.attrs
    names = [f"{p}_pop_mean" for p in TRUE_MEANS]
    table = az.summary(idata, var_names=names + ["noise_sd"])
    sampling = attrs["fit_time_s"] - attrs["init_time_s"]
    stats = idata.sample_stats
    evaluations = int(stats["n_steps"].values.sum())
    ess = {n: float(table.loc[n, "ess_bulk"]) for n in names}
    return {
        "run": name, **setting, "chains": chains, "warmup": warmup, "samples": samples,
        "seed": seed,
        "init_s": attrs["init_time_s"], "sampling_s": sampling, "wall_s": wall,
        "grad_per_s": evaluations / (sampling * chains) * (warmup + samples) / samples
        if sampling else None,
        "mean_n_steps": float(stats["n_steps"].values.mean()),
        "mean_step_size": float(stats["step_size"].values.mean()),
        "divergent": int(stats["diverging"].values.sum()),
        "solver_failures": int(stats["solver_failures"].values.sum()),
        "max_rhat": float(table["r_hat"].max()),
        "ess_bulk": ess,
        "ess_per_min": {n: e / (wall / 60) for n, e in ess.items()},
        "min_ess_per_min": min(ess.values()) / (wall / 60),
        "min_ess_per_min_sampling": min(ess.values()) / (sampling / 60),
        # what a user waits: wall time to 400 bulk ESS of the slowest population mean, at this
        # run's rate (initialisation once, sampling scaled)
        "minutes_to_400_ess": (attrs["init_time_s"] + sampling * 400 / min(ess.values())) / 60,
        "parameterisation": attrs.get("parameterisation", ""),
        "pop_mean_error_pct": {
            n: 100 * (float(idata.posterior[n].mean()) / TRUE_MEANS[n[:-9]] - 1) for n in names},
        "sample_mean_error_pct": {
            n: 100 * (float(idata.posterior[n].mean()) / float(truth[n[:-9]].mean()) - 1)
            for n in names},
        "noise_sd": float(idata.posterior["noise_sd"].mean()),
        "posterior_sd": {n: float(np.std(idata.posterior[n].values)) for n in names},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="default,centered-map,noncentered-map",
                        help=f"comma-separated run names, of {', '.join(RUNS)}")
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--samples", type=int, default=150)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/nuts.json")
    args = parser.parse_args(argv)
    import torch

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    records = []
    header = (f"{'run':<16} {'init s':>7} {'sampl s':>8} {'grad/s':>7} {'steps':>6} "
              f"{'div':>4} {'R-hat':>6} {'min ESS/min':>11} {'(sampling)':>10} {'min->400':>8} "
              f"{'ESS sy/Rinf/d/eta':>22} {'err % vs truth':>26}")
    print(header, flush=True)
    for name in args.runs.split(","):
        r = run(name, args.chains, args.warmup, args.samples, args.seed)
        records.append(r)
        ess = "/".join(f"{v:.0f}" for v in r["ess_bulk"].values())
        err = "/".join(f"{v:+.1f}" for v in r["pop_mean_error_pct"].values())
        print(f"{name:<16} {r['init_s']:7.1f} {r['sampling_s']:8.1f} {r['grad_per_s']:7.2f} "
              f"{r['mean_n_steps']:6.1f} {r['divergent']:4d} {r['max_rhat']:6.3f} "
              f"{r['min_ess_per_min']:11.1f} {r['min_ess_per_min_sampling']:10.1f} "
              f"{r['minutes_to_400_ess']:8.1f} {ess:>22} {err:>26}", flush=True)
        print(f"  {name}: {r['parameterisation']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(existing + records, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
