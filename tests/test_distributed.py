"""Data parallelism over specimens: the autograd pair, and fits on 2 local ranks (gloo)
equal to the single-process fit; torchrun; failures and bad worker counts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import arviz as az
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from bayescal.check import informative_path
from bayescal.cli import main
from bayescal.distributed import partition, world_from_environment
from bayescal.workers import free_port, launch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):  # a test is one process
    ENV.pop(name, None)

#: Two calibrated parameters, a fixed grid and one chunk: a fit in seconds.
CARD = """
[model]
name = "perzyna-voce"

[solver]
n_chunk = 400
substeps = 2
rtol = 1e-12
atol = 1e-8

[parameters.E]
value = 200000.0

[parameters.sy]
bounds = [100.0, 600.0]
prior = [250.0, 60.0]
varies = "specimen"
spread = 0.1

[parameters.Rinf]
bounds = [20.0, 600.0]
prior = [200.0, 60.0]
varies = "shared"

[parameters.d]
value = 15.0

[parameters.eta]
value = 300.0

[parameters.n]
value = 3.0

[noise]
prior_scale = 10.0
"""


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """The card and data of 4 specimens of different lengths (so shards are trimmed and
    padded differently)."""
    folder = tmp_path_factory.mktemp("distributed")
    card = folder / "card.toml"
    card.write_text(CARD)
    time_, strain = (x.tolist() for x in informative_path(3))
    rows = []
    for sid, n in (("A", len(time_)), ("B", len(time_) - 6), ("C", len(time_)),
                   ("D", len(time_) - 2)):
        rows += [f"{sid},{time_[i]!r},{strain[i]!r}" for i in range(n)]
    load = folder / "load.csv"
    load.write_text("specimen,time,strain\n" + "\n".join(rows) + "\n")
    data = folder / "data.csv"
    assert main(["simulate", str(card), "--load", str(load), "--seed", "3", "--noise", "2",
                 "--out", str(data)]) == 0
    return card, data, load


def bayescal(*argv, timeout=300):
    """``python -m bayescal ARGV`` in a fresh process: (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "bayescal", *map(str, argv)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def assert_same_posterior(one: Path, two: Path, rtol: float = 1e-8) -> float:
    """Every posterior variable of the two fits equal within ``rtol`` (relative); the
    log likelihood too. Returns the largest relative difference."""
    a, b = az.from_netcdf(one), az.from_netcdf(two)
    worst = 0.0
    for group in ("posterior", "log_likelihood"):
        assert set(a[group].data_vars) == set(b[group].data_vars)
        for name in a[group].data_vars:
            x, y = a[group][name].values, b[group][name].values
            assert x.shape == y.shape
            rel = np.abs(x - y) / np.maximum(np.abs(x), 1e-12)
            worst = max(worst, float(rel.max()))
            assert rel.max() <= rtol, (group, name, float(rel.max()))
    # predicted stress: relative to the stress scale (it passes through zero on unloading)
    x = a.posterior_predictive["stress"].values
    y = b.posterior_predictive["stress"].values
    assert np.allclose(x, y, rtol=0, atol=1e-8 * np.nanmax(np.abs(x)), equal_nan=True)
    assert a.posterior.attrs["method"] == b.posterior.attrs["method"]
    return worst


MAP = ("--method", "map", "--draws", 3)


@pytest.fixture(scope="module")
def map_fit(problem, tmp_path_factory):
    """The single-process MAP fit the multi-rank ones are compared with (and predict from)."""
    card, data, _ = problem
    out = tmp_path_factory.mktemp("map") / "one"
    status, _, err = bayescal("fit", card, "--data", data, "--seed", 5, "--no-figures", *MAP,
                              "--out", out)
    assert status == 0, err
    return out / "posterior.nc"


def fit_pair(problem, tmp_path, *options, one=None):
    """The same fit in one process (unless given, ``one``) and on 2 workers; returns both
    posterior files."""
    card, data, _ = problem
    args = ["fit", card, "--data", data, "--seed", 5, "--no-figures", *options]
    two = tmp_path / "two"
    if one is None:
        status, out, err = bayescal(*args, "--out", tmp_path / "one")
        assert status == 0, err
        one = tmp_path / "one" / "posterior.nc"
    status, out, err = bayescal(*args, "--workers", 2, "--out", two)
    assert status == 0, err
    assert f"wrote {two / 'posterior.nc'}" in out
    assert out.count("wrote") == 1  # rank 0 alone prints
    return one, two / "posterior.nc"


# --------------------------------------------------------------------------- the split


def test_partition_balances_solve_cost_and_covers_every_specimen():
    parts = partition([10, 10, 10, 10, 4, 4], 2)
    assert sorted(j for p in parts for j in p) == list(range(6))
    assert all(p == sorted(p) for p in parts)
    cost = [len(p) * max([10, 10, 10, 10, 4, 4][j] for j in p) for p in parts]
    assert cost == [30, 30]
    assert partition([5.0, 1.0, 1.0], 3) == [[0], [1], [2]]
    with pytest.raises(ValueError):
        partition([1.0, 1.0], 3)


def test_ranks_from_torchrun_or_slurm_environment():
    assert world_from_environment({}) is None
    assert world_from_environment({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert world_from_environment({"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "MASTER_ADDR": "node1"}
    assert world_from_environment(slurm) == (3, 8)


# ------------------------------------------------------------------- the autograd pair


def _pair_worker(rank, port, card_text, queue):
    """One rank: the autograd pair on a small function, and the model's log joint and its
    gradient at three points."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_default_dtype(torch.float64)
    from bayescal.distributed import from_environment, shutdown

    comm = from_environment()
    shard = comm.shard([3.0, 1.0, 2.0, 2.0, 1.0])
    x = torch.linspace(0.5, 2.5, 5).requires_grad_(True)
    g = torch.tensor(0.7, requires_grad=True)
    local = shard.copy_to_shard(x * g, dim=-1)
    loss = shard.gather(torch.sin(local) * local, dim=-1).sum() + g**2
    loss.backward()
    pair = (float(loss.detach()), x.grad.tolist(), float(g.grad))
    value, grad = _log_joint(card_text, comm)
    import bayescal.integrate

    # a failed chunk re-solved for its failed paths alone, whatever the batch (the
    # single-process run below too), so that only the chunk length tells the runs apart
    bayescal.integrate.RESTRICT_MIN_BATCH = 0
    automatic = _log_joint(AUTOMATIC_CHUNKS_CARD, comm, points=50, spread=0.05)
    # plain lists: a tensor sent through a queue lives only as long as its sender
    queue.put((rank, pair, [(v.tolist(), g.tolist()) for v, g in ((value, grad), automatic)]))
    shutdown(comm)


#: :data:`CARD` with the chunk length chosen for the batch: 50 points of 3 specimens (150
#: paths) take chunks of 10 steps, a rank's 100 or 50 paths alone would take 20.
AUTOMATIC_CHUNKS_CARD = CARD.replace("n_chunk = 400\n", "")


def _log_joint(card_text, comm=None, points=3, spread=0.2):
    from bayescal.card import parse_card
    from bayescal.hierarchy import Hierarchy
    from bayescal.inference.packing import Packing, initial_values
    from bayescal.testing import synthetic

    experiments, _ = synthetic(3, 0, 4)
    h = Hierarchy(parse_card(card_text, "card.toml"), experiments, comm=comm)
    packing = Packing(h, initial_values(h))
    generator = torch.Generator().manual_seed(1)
    u = packing.u0 + spread * torch.randn(points, packing.dim, generator=generator)
    u.requires_grad_(True)
    value = packing.log_joint(u)
    value.sum().backward()
    return value.detach(), u.grad


def test_autograd_pair_gradient_equals_single_process_and_finite_differences(monkeypatch):
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=_pair_worker, args=(rank, port, CARD, queue))
             for rank in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (pair, joint)) for r, pair, joint in (queue.get(timeout=120)
                                                             for _ in procs))
    for p in procs:
        p.join(30)
        assert p.exitcode == 0

    def f(x, g):
        y = x * g
        return (torch.sin(y) * y).sum() + g**2

    x0, g0 = torch.linspace(0.5, 2.5, 5), torch.tensor(0.7)
    eps = 1e-6
    fd_x = torch.stack([(f(x0 + eps * e, g0) - f(x0 - eps * e, g0)) / (2 * eps)
                        for e in torch.eye(5)])
    fd_g = (f(x0, g0 + eps) - f(x0, g0 - eps)) / (2 * eps)
    for rank in range(2):
        (loss, grad_x, grad_g), _ = results[rank]
        grad_x = torch.tensor(grad_x)
        assert loss == pytest.approx(float(f(x0, g0)), rel=1e-14)
        assert torch.allclose(grad_x, fd_x, rtol=1e-8, atol=1e-10)
        assert grad_g == pytest.approx(float(fd_g), rel=1e-8)
    single = [_log_joint(CARD)]
    monkeypatch.setattr("bayescal.integrate.RESTRICT_MIN_BATCH", 0)  # as on the ranks
    single.append(_log_joint(AUTOMATIC_CHUNKS_CARD, points=50, spread=0.05))
    for rank in range(2):
        (v, g), (v_auto, g_auto) = ((torch.tensor(v), torch.tensor(g))
                                    for v, g in results[rank][1])
        # specimens of one length: the same shapes solved and summed in the same order, to
        # the last bit (a difference there grew tenfold a Newton iteration of a MAP fit)
        assert torch.equal(v, single[0][0]) and torch.equal(g, single[0][1])
        # chunks of the job's length on every rank: the same solution to the last bit (a
        # rank's own length gave 5.8e-12 relative in the gradient); the gradient's sums
        # over a rank's rows may round apart in the last place (3.4e-16 seen)
        assert torch.equal(v_auto, single[1][0])
        torch.testing.assert_close(g_auto, single[1][1], rtol=1e-14, atol=0)


def _planning_worker(rank, port, data, queue):
    """One rank: the grid planned before a fit (automatic sub-steps, the shipped card) and
    the integration error estimated at the prior centre, each rank doing its share."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_default_dtype(torch.float64)
    from bayescal.distributed import from_environment, shutdown

    comm = from_environment()
    queue.put((rank, _plan_and_error(data, comm)))
    shutdown(comm)


def _plan_and_error(data, comm=None):
    """The grid planned over the prior population; the error estimate and the plan at a
    point whose shared value is a scalar (as the MAP's is)."""
    from bayescal.card import load_card
    from bayescal.data import read_experiments
    from bayescal.hierarchy import Hierarchy, plan_integration
    from bayescal.inference.accuracy import error_at

    spec = load_card(ROOT / "models" / "voce-jc.toml")  # C is shared
    h = Hierarchy(spec, read_experiments(data), comm=comm)
    n = h.experiments.n_specimens
    point = {name: torch.tensor(float(spec.parameters[name].prior[0])) if name in spec.shared
             else torch.linspace(0.8, 1.2, n) * spec.parameters[name].prior[0]
             for name in spec.calibrated}
    plan = plan_integration(spec, h.model, h.experiments, h.options, values=point, comm=comm)
    return h.substeps.tolist(), error_at(h, point).tolist(), plan.substeps.tolist()


def test_planning_on_two_ranks_equals_one_process(problem):
    """Each rank plans over its share of the specimens and the ranks agree on every
    refinement: the same grid as one process, and the same error estimate at a point."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=_planning_worker, args=(rank, port, problem[1], queue))
             for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    substeps, error, at_point = _plan_and_error(problem[1])
    assert max(substeps) > 1 and max(at_point) > 1  # the plans refined something
    for rank in range(2):
        assert results[rank][0] == substeps and results[rank][2] == at_point
        # voce-jc's Newton retries chunks of a batch alike: a shard's specimens converge by
        # other routes, to stresses within 1e-6 MPa (the tolerance is 0.05 MPa)
        np.testing.assert_allclose(results[rank][1], error, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------- fits, 2 ranks


def test_map_on_two_workers_equals_one_process(problem, tmp_path, map_fit):
    one, two = fit_pair(problem, tmp_path, *MAP, one=map_fit)
    assert assert_same_posterior(one, two) < 1e-8


@pytest.mark.slow
def test_svi_on_two_workers_equals_one_process(problem, tmp_path):
    one, two = fit_pair(problem, tmp_path, "--method", "svi", "--guide", "normal",
                        "--steps", 4, "--particles", 2, "--draws", 10)
    assert assert_same_posterior(one, two) < 1e-8
    assert az.from_netcdf(two).posterior.attrs["steps"] > 4  # Newton then 4 SVI steps


@pytest.mark.slow
def test_nuts_on_two_workers_equals_one_process(problem, tmp_path):
    one, two = fit_pair(problem, tmp_path, "--method", "nuts", "--chains", 2, "--warmup", 4,
                        "--samples", 4, "--max-tree-depth", 3)
    assert assert_same_posterior(one, two) < 1e-8
    assert az.from_netcdf(two).posterior.sizes["chain"] == 2


def test_predict_on_two_workers_equals_one_process(problem, tmp_path, map_fit):
    load = problem[2]
    results = []
    for workers in (1, 2):
        out = tmp_path / f"predict{workers}"
        status, _, err = bayescal("predict", map_fit, "--load", load, "--draws", 6,
                                  "--no-figures", "--workers", workers, "--out", out)
        assert status == 0, err
        results.append(az.from_netcdf(out / "predictions.nc").predictions["stress"].values)
    scale = np.nanmax(np.abs(results[0]))
    assert np.allclose(results[0], results[1], rtol=0, atol=1e-10 * scale, equal_nan=True)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent))
                    is None, reason="torchrun not installed beside this Python")
def test_torchrun_runs_the_same_fit(problem, tmp_path, map_fit):
    card, data, _ = problem
    args = ["fit", card, "--data", data, "--seed", 5, "--no-figures", *MAP]
    two = tmp_path / "two"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "bayescal",
                           *map(str, args), "--out", str(two)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote") == 1
    assert assert_same_posterior(map_fit, two / "posterior.nc") < 1e-8


# ------------------------------------------------------------------------------ failures


def test_bad_worker_counts_exit_2_with_one_line(problem, tmp_path, capsys):
    card, data, _ = problem
    for workers, message in (
            (0, "bayescal: error: --workers must be at least 1, got 0\n"),
            (5, f"bayescal: error: --workers 5: more workers than specimens (4 in {data}); "
                "each worker needs at least one specimen\n")):
        status = main(["fit", str(card), "--data", str(data), "--method", "map",
                       "--workers", str(workers), "--out", str(tmp_path / "out")])
        out, err = capsys.readouterr()
        assert status == 2 and err == message
        assert not (tmp_path / "out" / "posterior.nc").exists()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e[5:].decode() for e in environ if e.startswith(b"RANK=")), None)


def _long_fit_on_two_workers(card, data, out) -> tuple[subprocess.Popen, int]:
    """A long SVI fit launched with ``--workers 2``, some seconds into the fit: the launcher
    and the process id of its rank 1."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "bayescal", "fit", str(card), "--data", str(data), "--method",
         "svi", "--steps", "1000", "--guide", "normal", "--no-figures", "--workers", "2",
         "--out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    ranks: dict[str, int] = {}
    deadline = time.monotonic() + 120
    while len(ranks) < 2 and time.monotonic() < deadline and launcher.poll() is None:
        ranks = {_rank_of(c): c for c in _children(launcher.pid)}
        time.sleep(0.2)
    assert set(ranks) >= {"0", "1"}
    time.sleep(8)  # into the fit
    return launcher, ranks


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_killed_worker_fails_the_job_in_one_line_and_writes_nothing(problem, tmp_path):
    card, data, _ = problem
    out = tmp_path / "out"
    launcher, ranks = _long_fit_on_two_workers(card, data, out)
    os.kill(ranks["1"], signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    lines = [line for line in err.splitlines() if "error" in line]
    assert launcher.returncode == 1
    assert lines == ["bayescal: error: worker 1 of 2 was killed (SIGKILL); the job stopped "
                     "and wrote no results"]
    assert not (out / "posterior.nc").exists()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_terminated_launcher_stops_its_workers(problem, tmp_path):
    """A time limit's SIGTERM to the launcher stops every worker, in one line."""
    card, data, _ = problem
    out = tmp_path / "out"
    launcher, ranks = _long_fit_on_two_workers(card, data, out)
    launcher.terminate()
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGTERM
    assert [line for line in err.splitlines() if "error" in line] == [
        "bayescal: error: terminated (SIGTERM); the workers were stopped and wrote no results"]
    assert all(_gone(pid) for pid in ranks.values())
    assert not (out / "posterior.nc").exists()


FAILING_RANK = """
import sys
from bayescal.cli import _error, _peer_failure
from bayescal.distributed import from_environment
comm = from_environment()
if comm.rank == 1:
    _error("SolverFailure: the solver failed for 1 of 2 simulated specimens")
    sys.exit(1)
try:
    comm.barrier()
except Exception as exc:
    _error(str(exc), peer=_peer_failure(exc))
    sys.exit(1)
"""


def test_failing_shard_is_reported_once_not_its_peers(capfd):
    status = launch(["-c", FAILING_RANK], 2, program=[sys.executable])
    err = capfd.readouterr().err
    assert status == 1
    assert err == ("bayescal: error: worker 1 of 2: SolverFailure: the solver failed for 1 of "
                   "2 simulated specimens\n")
