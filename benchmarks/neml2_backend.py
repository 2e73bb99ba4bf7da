"""Benchmark: the NEML2 backend against the built-in model, eager and compiled.

**Gradient evaluations** (the work of one SVI step per particle batch, or one MAP
iteration's gradient): forward solve + pyzag's chunked adjoint of ``sum(stress**2)`` over
``--specimens`` specimens (default 8) on the informative path (two rates, a hold, an unload,
a reload; ``--points`` recorded points a segment, default 10), sub-stepped by each card's
``[solver]`` table, every calibrated parameter requiring grad and 2 % apart from specimen to
specimen (around the prior centres). Cases:

* ``builtin perzyna-voce``: ``models/perzyna-voce.toml``;
* ``neml2 perzyna-voce``: the same equations as a NEML2 file
  (``models/neml2/perzyna-voce.toml``), eager and compiled (:func:`neml2.compile`);
* ``neml2 kocks-mecking``: ``models/neml2/kocks-mecking.toml`` at 600 K, eager and compiled.

Each case runs in its own process (this script re-invoked with ``--case JSON``) with one
intra-op thread; a compiled case gets a fresh, empty ``TORCHINDUCTOR_CACHE_DIR`` so that its
compilation is measured cold. ``first_s`` is the first gradient evaluation (for a compiled
case: compilation of every chunk shape, forward and backward, plus the evaluation);
``seconds`` the best of ``--repeats`` later ones (default 3); ``per_step_ms`` = seconds per
integration step. The stress and gradient of a compiled case are compared with the eager
case's (``max_stress_diff``, ``max_grad_rel_diff``).

**Robustness** (``--robustness``, on by default): NEML2's statistical tutorial conditions
(100 steps to 25 % strain, 5 rates from 1e-6 to 1 /s x 10 temperatures from 310 to 1190 K)
with the Kocks-Mecking model, forward only: a tutorial-like solver (zero predictor, no
one-step first chunk, rtol 1e-6 / atol 1e-4 on the one residual norm, no retries) and
bayescal's (card settings: step-extrapolating predictor, one-step first chunk, tolerances
1e-8, retries), both against a sequential solve at 1e-10: NaN specimens, largest stress error.

Usage::

    PYTHONPATH=. python benchmarks/neml2_backend.py                  # everything (compiled cases: ~15 min each on 2 cores)
    PYTHONPATH=. python benchmarks/neml2_backend.py --no-compile     # eager cases and robustness (~3 min)
    PYTHONPATH=. python benchmarks/neml2_backend.py --case '{"model": "neml2-perzyna-voce", "compile": true}'

Results: a table on stdout and ``benchmarks/results/neml2.json`` (``--out``, rewritten after
every case): ``{"cases": [...], "robustness": [...], "machine": {..., "load_average"}}``.
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
CARDS = {
    "builtin-perzyna-voce": ROOT / "models" / "perzyna-voce.toml",
    "neml2-perzyna-voce": ROOT / "models" / "neml2" / "perzyna-voce.toml",
    "neml2-kocks-mecking": ROOT / "models" / "neml2" / "kocks-mecking.toml",
}
TEMPERATURE = 600.0  # K, for the Kocks-Mecking cases
CASES = [
    {"model": "builtin-perzyna-voce", "compile": False},
    {"model": "neml2-perzyna-voce", "compile": False},
    {"model": "neml2-perzyna-voce", "compile": True},
    {"model": "neml2-kocks-mecking", "compile": False},
    {"model": "neml2-kocks-mecking", "compile": True},
]


def gradient_case(case: dict) -> dict:
    """One gradient-evaluation case, in this process."""
    import torch

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    from bayescal.card import load_card, load_model
    from bayescal.check import check_parameters, informative_path
    from bayescal.integrate import fixed_substeps, plan_substeps, refine, simulate

    spec = load_card(CARDS[case["model"]])
    model = load_model(spec, compile=case["compile"])
    b = case["specimens"]
    time_, strain = informative_path(case["points"])
    time_, strain = time_[:, None].repeat(1, b), strain[:, None].repeat(1, b)
    temperature = torch.full_like(time_, TEMPERATURE) if "kocks" in case["model"] else None
    # the grid simulate would choose, made once outside the timed solves
    if spec.solver.automatic:
        substeps = plan_substeps(model, check_parameters(spec), time_, strain, spec.solver,
                                 temperature).substeps
    else:
        substeps = fixed_substeps(time_, strain, spec.solver)
    steps = refine(time_, strain, substeps, temperature).n_steps
    spread = 1.0 + 0.02 * torch.linspace(-1.0, 1.0, b)

    def evaluate(model):
        params = {k: (v * spread if k in spec.calibrated else torch.full((b,), v))
                  .requires_grad_(k in spec.calibrated)
                  for k, v in check_parameters(spec).items()}
        start = time.perf_counter()
        stress, report = simulate(model, params, time_, strain, spec.solver,
                                  temperature=temperature, substeps=substeps)
        stress.square().sum().backward()
        seconds = time.perf_counter() - start
        assert report.n_failed == 0, report.failed_indices()
        grads = torch.stack([params[k].grad for k in spec.calibrated])
        return seconds, stress.detach(), grads

    first, stress, grads = evaluate(model)
    best = min(evaluate(model)[0] for _ in range(case["repeats"]))
    record = {**case, "steps": steps, "recorded_points": time_.shape[0], "first_s": first,
              "seconds": best, "per_step_ms": 1e3 * best / steps}
    if case["compile"]:  # the eager model, for the comparison
        _, eager_stress, eager_grads = evaluate(load_model(spec, compile=False))
        record["max_stress_diff"] = float((stress - eager_stress).abs().max())
        record["max_grad_rel_diff"] = float(((grads - eager_grads).abs()
                                             / eager_grads.abs().clamp_min(1e-300)).max())
    return record


def robustness_case() -> list[dict]:
    """Tutorial conditions with the Kocks-Mecking model, forward only, in this process."""
    import torch

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    from dataclasses import replace

    from bayescal.card import load_card, load_model
    from bayescal.check import check_parameters
    from bayescal.integrate import Grid, SolverOptions, integrate

    spec = load_card(CARDS["neml2-kocks-mecking"])
    model = load_model(spec)
    rates, temperatures = torch.logspace(-6, 0, 5), torch.linspace(310.0, 1190.0, 10)
    strain = torch.linspace(0, 0.25, 100)[:, None].expand(-1, 50).contiguous()
    grid = Grid(strain / rates.repeat_interleave(10), strain, torch.arange(100),
                temperatures.repeat(5).expand(100, -1).contiguous())
    params = check_parameters(spec)
    settings = {
        "sequential, tolerances 1e-10 (reference)": SolverOptions(n_chunk=1, rtol=1e-10,
                                                                   atol=1e-10),
        "tutorial-like: n_chunk 10, zero predictor, rtol 1e-6, atol 1e-4, no retries":
            SolverOptions(n_chunk=10, predictor="zero", first_chunk=0, rtol=1e-6, atol=1e-4,
                          retry=False),
        "tutorial tolerances with bayescal's predictor, first chunk and retries":
            SolverOptions(n_chunk=10, rtol=1e-6, atol=1e-4),
        "bayescal (card): n_chunk 10": replace(spec.solver, n_chunk=10),
        "bayescal (card): n_chunk 50": replace(spec.solver, n_chunk=50),
    }
    out, reference = [], None
    for name, options in settings.items():
        start = time.perf_counter()
        states, report = integrate(model, params, grid, options, adjoint=False)
        seconds = time.perf_counter() - start
        stress = model.stress(states)
        reference = stress if reference is None else reference
        error = (stress - reference).abs()
        finite = torch.isfinite(error)
        out.append({"setting": name, "n_chunk": options.n_chunk, "seconds": seconds,
                    "nan_specimens": int((~finite).any(0).sum()), "retries": report.retries,
                    "max_stress_error": float(error[finite].max()) if finite.any() else None})
    return out


def run_case(case: dict) -> dict | list:
    """``case`` in a fresh process (a compiled one with an empty inductor cache)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory(prefix="bayescal-inductor-") as cache:
        if case.get("compile"):
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--case",
                               json.dumps(case)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(cases: list[dict], robustness: list[dict]) -> None:
    builtin = next((c["seconds"] for c in cases if c["model"].startswith("builtin")), None)
    eager = {c["model"]: c["seconds"] for c in cases if not c["compile"]}
    print(f"{'model':<22} {'compile':<8} {'steps':>5} {'first s':>9} {'best s':>8} "
          f"{'ms/step':>8} {'x builtin':>10} {'eager/compiled':>15}")
    for c in cases:
        vs_builtin = f"{c['seconds'] / builtin:.1f}" if builtin else "-"
        speedup = (f"{eager[c['model']] / c['seconds']:.2f}"
                   if c["compile"] and c["model"] in eager else "")
        print(f"{c['model']:<22} {str(c['compile']).lower():<8} {c['steps']:>5} "
              f"{c['first_s']:>9.2f} {c['seconds']:>8.3f} {c['per_step_ms']:>8.2f} "
              f"{vs_builtin:>10} {speedup:>15}")
    for c in cases:
        if "max_stress_diff" in c:
            print(f"{c['model']} compiled vs eager: max |stress diff| {c['max_stress_diff']:.2g} "
                  f"MPa, max relative gradient diff {c['max_grad_rel_diff']:.2g}")
    if robustness:
        print("\nTutorial conditions (100 steps x 50 specimens, 1e-6..1 /s, 310..1190 K), "
              "Kocks-Mecking, forward only:")
        for r in robustness:
            err = "-" if r["max_stress_error"] is None else f"{r['max_stress_error']:.3g} MPa"
            print(f"  {r['setting']:<78} {r['seconds']:6.1f} s  NaN specimens "
                  f"{r['nan_specimens']:>2}  retries {r['retries']:>2}  max |error| {err}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", help="run one case (JSON) in this process")
    parser.add_argument("--specimens", type=int, default=8)
    parser.add_argument("--points", type=int, default=10, help="recorded points a segment")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled cases")
    parser.add_argument("--no-robustness", action="store_true")
    parser.add_argument("--models", default=",".join(CARDS),
                        help="comma-separated subset of " + ", ".join(CARDS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "neml2.json"))
    args = parser.parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        result = robustness_case() if case.get("robustness") else gradient_case(
            {"specimens": 8, "points": 10, "repeats": 3, **case})
        print(json.dumps(result))
        return 0
    from importlib.metadata import version

    models = args.models.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"cases": [], "robustness": [], "machine": {
        "python": platform.python_version(), "torch": version("torch"),
        "neml2": version("neml2"), "pyzag": version("pyzag"), "cpus": os.cpu_count(),
        "threads": 1, "load_average": os.getloadavg()}}
    todo = [{**case, "specimens": args.specimens, "points": args.points,
             "repeats": args.repeats} for case in CASES
            if case["model"] in models and not (case["compile"] and args.no_compile)]
    if not args.no_robustness:
        todo.append({"robustness": True})
    for case in todo:  # results are written after every case
        print(f"running {case} ...", flush=True)
        if case.get("robustness"):
            results["robustness"] = run_case(case)
        else:
            results["cases"].append(run_case(case))
        results["machine"]["load_average"] = os.getloadavg()  # at the last write
        out.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results["cases"], results["robustness"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
