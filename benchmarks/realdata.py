"""Benchmark: the 304L set end to end, as a user runs it, on 1 and 2 workers.

Sandia's 304L tension tests (``../shared/realdata/matcal_304L_rate/small_tension``, 64
specimens, BSD-3; never copied into the repository) are imported with ``bayescal import
matcal`` into a temporary folder, then fitted with the tutorial's card and command
(docs/tutorial-304L.md)::

    bayescal fit models/voce-jc.toml --data 304L.csv --method METHOD --draws 400 \\
        --workers K --out FIT

for each ``--methods`` (``laplace``; ``svi`` with ``--guide mvn``, the default guide),
``--workers`` (1, 2) and ``--tolerances`` (the card's ``[solver] tolerance`` by default;
another value runs a copy of the card with only that line changed, to weigh the
integration error against the time side by side), each a fresh command (figures written, as
the tutorial's are). Reported per run: the wall time of the command (start-up, import of
torch, grid planning, MAP, Laplace or SVI, draws, importance check, figures), the
integration steps, the MAP's Newton iterations and log joint, SVI steps, the posterior
means of the noise sd and of the population means, and the Pareto k-hat, from
``posterior.nc``. Rows are added to ``benchmarks/results/realdata.json`` (``--out``; a
method, worker count and tolerance measured again replaces its row), so that the runs can
be made one at a time.

Usage::

    PYTHONPATH=. python benchmarks/realdata.py                         # laplace, 1 and 2
    PYTHONPATH=. python benchmarks/realdata.py --methods svi --workers 2 --timeout 1800
    PYTHONPATH=. python benchmarks/realdata.py --workers 2 --tolerances 0.05 0.5

A run longer than ``--timeout`` seconds is stopped and reported as such (its launcher
stops its workers).
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
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "realdata" / "matcal_304L_rate" / "small_tension"
CARD = ROOT / "models" / "voce-jc.toml"


def bayescal(*argv: str, timeout: float | None = None) -> tuple[int, float, str]:
    """``python -m bayescal ARGV``: exit status, wall time and the last line of stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "bayescal", *argv], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, time.perf_counter() - start, f"stopped after {timeout:.0f} s"
    lines = done.stderr.replace("\r", "\n").strip().splitlines()
    return done.returncode, time.perf_counter() - start, lines[-1] if lines else ""


def with_tolerance(card_text: str, tolerance: float) -> str:
    """The card with its ``[solver] tolerance`` line set to ``tolerance``."""
    lines = card_text.splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if line.startswith("tolerance")]
    if len(at) != 1:
        sys.exit(f"{CARD}: expected one 'tolerance = ...' line, found {len(at)}")
    lines[at[0]] = f"tolerance = {tolerance!r}\n"
    return "".join(lines)


def summary(posterior: Path) -> dict:
    """What the run's ``posterior.nc`` says of the fit."""
    import arviz as az

    idata = az.from_netcdf(posterior)
    attrs = idata.posterior.attrs
    log_joint = list(attrs.get("log_joint_map", []))
    return {"map_iterations": len(log_joint),
            "map_log_joint": float(log_joint[-1]) if log_joint else None,
            "steps": int(attrs["steps"]), "integration_steps": int(attrs["integration_steps"]),
            "noise_sd": float(idata.posterior["noise_sd"].mean()),
            "population_means": {name: float(idata.posterior[name].mean())
                                 for name in idata.posterior.data_vars
                                 if name.endswith("_pop_mean") or name == "C"},
            "pareto_k": float(attrs.get("pareto_k", float("nan"))),
            "fit_time_s": float(attrs["fit_time_s"]), "wall_time_s": float(attrs["wall_time_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the 304L small_tension folder")
    parser.add_argument("--methods", nargs="+", default=["laplace"], choices=["laplace", "svi"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--tolerances", nargs="+", type=float, default=[None],
                        help="integration tolerances (MPa) to run the card at (default: its own)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "realdata.json")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: the 304L data are not here (../shared/realdata)")
    previous = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    rows = {(row["method"], row["workers"], row["tolerance"]): row for row in previous}
    card_text = CARD.read_text()
    own = float(tomllib.loads(card_text)["solver"]["tolerance"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    print(f"{'method':>8} {'workers':>7} {'tol MPa':>7} {'grid':>5} {'wall s':>7} {'MAP it':>6} "
          f"{'log joint':>10} {'SVI steps':>9} {'noise sd':>8} {'k-hat':>6}  status")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "304L.csv"
        status, _, message = bayescal("import", "matcal", str(args.data), "--out", str(data))
        if status:
            sys.exit(f"import failed: {message}")
        for tolerance in (own if t is None else t for t in args.tolerances):
            card = CARD
            if tolerance != own:
                card = Path(tmp) / f"voce-jc-{tolerance:g}.toml"
                card.write_text(with_tolerance(card_text, tolerance))
            for method in args.methods:
                for workers in args.workers:
                    out = Path(tmp) / f"{method}-{workers}-{tolerance:g}"
                    status, wall, message = bayescal(
                        "fit", str(card), "--data", str(data), "--method", method, "--draws",
                        "400", "--workers", str(workers), "--out", str(out),
                        timeout=args.timeout)
                    row = {"method": method, "workers": workers, "tolerance": tolerance,
                           "wall_s": wall, "status": status, "message": message,
                           "commit": commit}
                    if status == 0:
                        row.update(summary(out / "posterior.nc"))
                    rows[(method, workers, tolerance)] = row
                    print(f"{method:>8} {workers:>7} {tolerance:>7g} "
                          f"{row.get('integration_steps', '-'):>5} {wall:>7.1f} "
                          f"{row.get('map_iterations', '-'):>6} "
                          f"{row.get('map_log_joint') or float('nan'):>10.1f} "
                          f"{row.get('steps', '-'):>9} {row.get('noise_sd', float('nan')):>8.2f} "
                          f"{row.get('pareto_k', float('nan')):>6.2f}  "
                          f"{'ok' if status == 0 else message}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, 2 cores, 1 thread per "
                   "worker", "card": str(CARD.relative_to(ROOT)), "draws": 400,
        "rows": sorted(rows.values(),
                       key=lambda r: (r["method"], r["workers"], r["tolerance"]))},
        indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
