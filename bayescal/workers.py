"""``--workers K``: the same command run as K local processes, one rank each (gloo on CPU).

Each worker is ``python -m bayescal`` with the user's arguments and the variables torchrun
would set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``: a free
port on localhost), so that a worker cannot tell ``--workers`` from torchrun and there is one
code path for both. Rank 0 keeps this terminal (its progress, warnings and summary); the
others' output is discarded.

Failures: every worker writes its one-line error into a file of its own
(``BAYESCAL_ERROR_FILE``) instead of the terminal. The first worker to fail is the cause (the
others fail after it, when its connection closes, or are stopped here at once); its line,
or how it ended (a signal), is the one line printed, and its exit status (2 for bad input,
else 1) is the command's. Rank 0 writes the outputs last and atomically, so a failed job
leaves no ``posterior.nc`` behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

#: The variable naming the file where a worker writes its error line.
ERROR_FILE = "BAYESCAL_ERROR_FILE"
#: Seconds between looks at the workers.
POLL = 0.05
#: How a worker's error line starts when it failed only because a peer did (its
#: connection closed); such a worker is never named as the cause.
PEER = "(peer) "


def free_port() -> int:
    """A TCP port free on localhost now (rank 0 listens on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_environment(rank: int, workers: int, port: int, error_file: Path) -> dict[str, str]:
    """The environment of worker ``rank``: this one, plus torchrun's variables."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(workers), "LOCAL_WORLD_SIZE": str(workers),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), ERROR_FILE: str(error_file)}


def launch(argv: Sequence[str], workers: int, program: Sequence[str] | None = None) -> int:
    """Run ``program + argv`` (default ``python -m bayescal``) as ``workers`` ranks and
    return the job's exit status, printing one line on a failure (see the module)."""
    program = list(program or [sys.executable, "-m", "bayescal"])
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bayescal-workers-") as folder:
        files = [Path(folder) / f"error{rank}" for rank in range(workers)]
        procs = []
        # a batch system's time limit (or `timeout`, or `kill`) ends the launcher with
        # SIGTERM: stop the workers then too, rather than leave them running on
        terminate = signal.signal(signal.SIGTERM, _terminated)
        try:
            for rank in range(workers):
                quiet = subprocess.DEVNULL if rank else None
                procs.append(subprocess.Popen(
                    program + list(argv), env=worker_environment(rank, workers, port,
                                                                 files[rank]),
                    stdout=quiet, stderr=quiet))
            failed = _wait(procs)
        except KeyboardInterrupt:
            _stop(procs)
            print("bayescal: error: interrupted", file=sys.stderr)
            return 130
        except _Terminated:
            _stop(procs)
            print("bayescal: error: terminated (SIGTERM); the workers were stopped and wrote "
                  "no results", file=sys.stderr)
            return 128 + signal.SIGTERM
        finally:
            signal.signal(signal.SIGTERM, terminate)
        if not failed:
            return 0
        cause = _cause(failed, procs, files)
        status = procs[cause].returncode
        print(f"bayescal: error: {_describe(cause, status, files[cause], workers)}",
              file=sys.stderr)
        return status if status in (1, 2, 130) else 1


class _Terminated(Exception):
    """The launcher received SIGTERM."""


def _terminated(signum: int, frame) -> None:
    raise _Terminated


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    """Wait for every worker; once one fails, stop the others and return the ranks found
    failed at that moment (empty: all succeeded)."""
    while True:
        statuses = [proc.poll() for proc in procs]
        failed = [rank for rank, status in enumerate(statuses) if status not in (None, 0)]
        if failed:
            _stop(procs)
            return failed
        if all(status is not None for status in statuses):
            return []
        time.sleep(POLL)


def _cause(failed: list[int], procs: list[subprocess.Popen], files: list[Path]) -> int:
    """Of workers found failed together, the cause: one killed by a signal, else one that
    did not fail only because of a peer (:data:`PEER`), else the lowest rank."""
    def peer(rank: int) -> bool:
        try:
            return files[rank].read_text(encoding="utf-8", errors="replace").startswith(PEER)
        except OSError:
            return False

    return min(failed, key=lambda rank: (procs[rank].returncode >= 0, peer(rank), rank))


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate the workers still running (a worker blocked in a collective with a dead
    peer would otherwise wait for its timeout), then kill what is left."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 5
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _describe(rank: int, status: int, error_file: Path, workers: int) -> str:
    """The failed worker's own error line, or how it ended."""
    try:
        line = error_file.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        line = ""
    where = f"worker {rank} of {workers}"
    line = line.removeprefix(PEER)
    if line:
        return f"{where}: {line}"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"{where} was killed ({name}); the job stopped and wrote no results"
    return f"{where} ended with exit status {status}; the job stopped and wrote no results"
