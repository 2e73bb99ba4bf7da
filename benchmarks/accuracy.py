"""Work-precision benchmark of the time integration: stress error against cost.

For each built-in model, on a load path sampled like test data, 12 specimens drawn from the
shipped card's prior population (seed 0):

* **error**: stress at the recorded points against an independent reference
  (:func:`bayescal.reference.radau_stress`: scipy's Radau on the contract equations, rtol =
  atol = 1e-10), rms over all points and specimens, and the worst point;
* **cost**: the time of one gradient evaluation, forward solve + chunked adjoint of
  ``sum(w * stress)`` with respect to every calibrated parameter (best of ``--repeats``,
  one thread), on the grid the setting gives, and the planning time of automatic grids
  (step doubling, once per fit).

Settings: ``backward-euler`` and ``radau-iia`` (and ``sdirk2``, ``radau-iia5``) at fixed
sub-steps ``m`` per recorded interval (``4 m`` after a change of strain rate), and the
automatic grids at several tolerances. The table's last lines compare the default
(``radau-iia``, tolerance 0.05 MPa) with backward Euler at the same error, interpolated
log-log along backward Euler's curve, and with backward Euler at 4/16 and 16/64 sub-steps.

Paths (``POINTS`` recorded points a segment):

* perzyna-voce: 1e-3 /s to 1.5 %, 300 s hold, 1e-2 /s to 3 %, unload at -1e-2 /s to 2.7 %,
  reload at 1e-4 /s to 3.5 %;
* chaboche: two cycles of +-1 % at 1e-3 /s, a 100 s hold at 1 %, 1e-2 /s to 2 %;
* voce-jc: 100 /s to 40 %.

Usage::

    PYTHONPATH=. python benchmarks/accuracy.py            # all (about 6 min on 2 cores)
    PYTHONPATH=. python benchmarks/accuracy.py --quick    # fewer settings
    PYTHONPATH=. python benchmarks/accuracy.py --summarise  # summary and figure again

Writes ``benchmarks/results/accuracy.json`` and ``benchmarks/results/accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bayescal.card import load_card, load_model
from bayescal.check import piecewise_path
from bayescal.hierarchy import draw_specimens
from bayescal.reference import radau_stress
from bayescal.integrate import (SolverOptions, fixed_substeps, plan_substeps, refine,
                               solve_recorded)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SPECIMENS = 12
POINTS = 40

PATHS = {
    "perzyna-voce": [(15.0, 0.015), (300.0, 0.015), (1.5, 0.03), (0.03, 0.0297),
                     (80.0, 0.0377)],
    "chaboche": [(10.0, 0.01), (20.0, -0.01), (20.0, 0.01), (20.0, -0.01), (20.0, 0.01),
                 (100.0, 0.01), (1.0, 0.02)],
    "voce-jc": [(0.004, 0.4)],
}
FIXED = {"backward-euler": (2, 4, 8, 16, 32, 64), "radau-iia": (1, 2, 4, 8, 16),
         "sdirk2": (2, 4, 8, 16, 32), "radau-iia5": (1, 2, 4, 8)}
TOLERANCES = {"radau-iia": (0.5, 0.2, 0.05, 0.01, 0.002), "backward-euler": (0.5, 0.2),
              "sdirk2": (0.2, 0.05, 0.01), "radau-iia5": (0.2, 0.05, 0.01)}
QUICK_FIXED = {"backward-euler": (4, 16, 64), "radau-iia": (2, 8)}
QUICK_TOLERANCES = {"radau-iia": (0.2, 0.05, 0.01)}
DEFAULT = ("radau-iia", "tolerance", 0.05)


def problem(name: str):
    """The model, its 12 specimens' parameters and the recorded path ``(n, 12)``."""
    spec = load_card(ROOT / "models" / f"{name}.toml")
    params = draw_specimens(spec, SPECIMENS, seed=0)
    t, e = piecewise_path(PATHS[name], POINTS)
    time_ = t[:, None].expand(-1, SPECIMENS).contiguous()
    strain = e[:, None].expand(-1, SPECIMENS).contiguous()
    return spec, load_model(spec), params, time_, strain


def reference(name: str, params, time_, strain) -> np.ndarray:
    """Reference stress ``(n, 12)``."""
    cols = [radau_stress(name, {k: float(v[i]) for k, v in params.items()},
                         time_[:, i].numpy(), strain[:, i].numpy())
            for i in range(SPECIMENS)]
    return np.stack(cols, axis=1)


def gradient_time(model, params, calibrated, grid, options, repeats: int) -> float:
    """Best time of forward + adjoint of a weighted stress sum."""
    w = torch.linspace(0.5, 1.5, grid.recorded.numel(), dtype=torch.float64)[:, None]
    best = math.inf
    for _ in range(repeats):
        p = {k: v.clone().requires_grad_(k in calibrated) for k, v in params.items()}
        start = time.perf_counter()
        states, _, report = solve_recorded(model, p, grid, options)
        (w * model.stress(states)).sum().backward()
        best = min(best, time.perf_counter() - start)
        if report.n_failed:
            return math.nan
    return best


def run_setting(name, spec, model, params, time_, strain, exact, scheme, mode, value,
                repeats):
    base = SolverOptions(n_chunk=spec.solver.n_chunk, scheme=scheme, rtol=spec.solver.rtol,
                         atol=spec.solver.atol)
    plan_s = 0.0
    if mode == "fixed":
        options = SolverOptions(**{**base.__dict__, "substeps": value})
        substeps = fixed_substeps(time_, strain, options)
    else:
        options = SolverOptions(**{**base.__dict__, "tolerance": value})
        start = time.perf_counter()
        substeps = plan_substeps(model, params, time_, strain, options).substeps
        plan_s = time.perf_counter() - start
    grid = refine(time_, strain, substeps)
    with torch.no_grad():
        states, _, report = solve_recorded(model, params, grid, options, adjoint=False)
    stress = model.stress(states).numpy()
    diff = stress - exact
    return {
        "model": name, "scheme": scheme, "mode": mode, "value": value,
        "steps": grid.n_steps - 1,
        "rms": float(np.sqrt(np.mean(diff**2))), "max": float(np.abs(diff).max()),
        "gradient_s": gradient_time(model, params, spec.calibrated, grid, options, repeats),
        "plan_s": plan_s, "failed": report.n_failed,
    }


def interpolate_time(curve, error):
    """Log-log interpolation of time at ``error`` along ``curve`` [(rms, seconds)];
    None outside its range."""
    curve = sorted(curve)
    for (e0, t0), (e1, t1) in zip(curve, curve[1:]):
        if e0 <= error <= e1:
            f = math.log(error / e0) / math.log(e1 / e0)
            return math.exp(math.log(t0) + f * math.log(t1 / t0))
    return None


def comparisons(rows):
    """The default against backward Euler: at equal error, at 4/16 and at 16/64."""
    out = []
    for name in PATHS:
        mine = [r for r in rows if r["model"] == name]
        default = next(r for r in mine if (r["scheme"], r["mode"], r["value"]) == DEFAULT)
        euler = [r for r in mine if r["scheme"] == "backward-euler" and r["mode"] == "fixed"]
        at_same = interpolate_time([(r["rms"], r["gradient_s"]) for r in euler], default["rms"])
        entry = {"model": name, "default_rms": default["rms"], "default_max": default["max"],
                 "default_s": default["gradient_s"], "plan_s": default["plan_s"],
                 "euler_s_at_same_error": at_same,
                 "finest_euler_rms": min(r["rms"] for r in euler)}
        radau = [r for r in mine if r["scheme"] == DEFAULT[0] and math.isfinite(r["rms"])]
        for m in (4, 16, 64):
            r = next((r for r in euler if r["value"] == m), None)
            if r:
                # the cheapest radau-iia setting at that error or better
                better = min((q for q in radau if q["rms"] <= r["rms"]),
                             key=lambda q: q["gradient_s"], default=None)
                entry[f"euler_{m}_{4 * m}"] = {
                    "rms": r["rms"], "max": r["max"], "s": r["gradient_s"],
                    "radau_s_at_that_error": better and better["gradient_s"]}
        out.append(entry)
    return out


def figure(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(PATHS), figsize=(5 * len(PATHS), 4.2))
    colours = {"backward-euler": "tab:red", "radau-iia": "tab:blue", "sdirk2": "tab:green",
               "radau-iia5": "tab:purple"}
    for ax, name in zip(axes, PATHS):
        for scheme, colour in colours.items():
            for mode, style in (("fixed", "o-"), ("tolerance", "s--")):
                pts = sorted((r["gradient_s"], r["rms"]) for r in rows
                             if r["model"] == name and r["scheme"] == scheme
                             and r["mode"] == mode and r["rms"] > 0)
                if pts:
                    ax.loglog(*zip(*pts), style, color=colour, ms=4,
                              label=f"{scheme}, {'fixed sub-steps' if mode == 'fixed' else 'tolerance'}")
        d = next(r for r in rows if r["model"] == name
                 and (r["scheme"], r["mode"], r["value"]) == DEFAULT)
        ax.loglog(d["gradient_s"], d["rms"], "*", color="black", ms=14, label="default")
        ax.axhline(0.2, color="grey", lw=0.8, ls=":")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(name)
        ax.set_xlabel("time of one gradient evaluation (s)")
        ax.set_ylabel("rms stress error vs reference (MPa)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Work-precision: {SPECIMENS} specimens, forward + adjoint, one thread")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def row_line(r: dict) -> str:
    """One row of the table."""
    label = f"{r['value']}/{4 * r['value']}" if r["mode"] == "fixed" else f"tol {r['value']:g}"
    return (f"{r['model']:<13} {r['scheme']:<15} {label:<12} {r['steps']:>6} {r['rms']:>9.3g} "
            f"{r['max']:>9.3g} {r['gradient_s']:>8.3f} {r['plan_s']:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy.json")
    parser.add_argument("--summarise", action="store_true",
                        help="reprint the table's summary and redraw the figure from --out")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    fixed = QUICK_FIXED if args.quick else FIXED
    tolerances = QUICK_TOLERANCES if args.quick else TOLERANCES
    saved = json.loads(args.out.read_text()) if args.summarise else None
    rows = [] if saved is None else saved["rows"]
    header = (f"{'model':<13} {'scheme':<15} {'setting':<12} {'steps':>6} {'rms MPa':>9} "
              f"{'max MPa':>9} {'grad s':>8} {'plan s':>7}")
    print(header)
    for r in rows:  # the saved rows (--summarise)
        print(row_line(r))
    for name in PATHS if saved is None else ():
        spec, model, params, time_, strain = problem(name)
        exact = reference(name, params, time_, strain)
        settings = [(s, "fixed", m) for s, ms in fixed.items() for m in ms]
        settings += [(s, "tolerance", t) for s, ts in tolerances.items() for t in ts]
        for scheme, mode, value in settings:
            r = run_setting(name, spec, model, params, time_, strain, exact, scheme, mode,
                            value, args.repeats)
            rows.append(r)
            print(row_line(r), flush=True)
    summary = comparisons(rows)
    print("\ndefault (radau-iia, tolerance 0.05 MPa) against backward Euler:")
    for c in summary:
        same = c["euler_s_at_same_error"]
        line = (f"{c['model']:<13} default rms {c['default_rms']:.3g} MPa (max "
                f"{c['default_max']:.3g}) in {c['default_s']:.3f} s; ")
        line += (f"backward Euler at that error {same:.3f} s ({same / c['default_s']:.1f}x)"
                 if same else f"backward Euler never reaches it (finest: "
                 f"{c['finest_euler_rms']:.3g} MPa)")
        for m in (4, 16, 64):
            e = c.get(f"euler_{m}_{4 * m}")
            if e:
                line += (f"\n    BE {m}/{4 * m}: {e['rms']:.3g} MPa in {e['s']:.3f} s, "
                         f"{e['s'] / c['default_s']:.2f}x the default's time; the cheapest "
                         f"radau-iia at that error or better: {e['radau_s_at_that_error']:.3f} s"
                         f" ({e['s'] / e['radau_s_at_that_error']:.1f}x faster than BE)")
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": saved["machine"] if saved else
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
        "specimens": SPECIMENS, "points_per_segment": POINTS,
        "rows": rows, "summary": summary}, indent=1) + "\n")
    figure(rows, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
