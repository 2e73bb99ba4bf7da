"""Writing outputs: one atomic writer for every file, and a lock on an output folder.

Every file bayescal writes (CSV tables, figures, netCDF, checkpoints) goes through
:func:`write_atomically`: a uniquely named temporary file in the target's folder, filled,
given the mode a plainly created file would get (``0666`` less the umask, so all outputs
agree whatever library made them), then renamed over the target. An interrupted or failed
write leaves the target as it was and removes the temporary file.

A folder that a run fills (``fit``, ``predict``) is held by :class:`FolderLock` meanwhile,
so that two runs cannot interleave their files into one folder.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Callable

from bayescal.errors import BadInput

#: The lock file in a folder that a run is writing.
LOCK_NAME = ".bayescal.lock"


def file_mode() -> int:
    """The mode of a newly created file under the current umask (``0644`` under ``022``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fill_temporary(fd: int, tmp: str | os.PathLike, path: Path, write: Callable, mode: str,
                   **open_kwargs) -> None:
    """Fill the temporary file ``tmp`` (open descriptor ``fd``) with ``write(file)``, give it
    the usual mode (:func:`file_mode`) and rename it over ``path``; on any failure (an
    interrupt included) remove it, leaving ``path`` as it was."""
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            write(f)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike, write: Callable, mode: str = "wb",
                     **open_kwargs) -> Path:
    """Write ``path`` atomically with ``write(file)`` on a temporary file opened in ``mode``
    (see the module docstring); returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    fill_temporary(fd, tmp, path, write, mode, **open_kwargs)
    return path


def write_atomically_by_name(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """:func:`write_atomically` for writers that take a file name, not a file (netCDF):
    ``write(temporary_name)``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    fill_temporary(fd, tmp, path, lambda f: write(tmp), "wb")
    return path


def prepare_output_folder(folder: str | os.PathLike, option: str = "--out",
                          create: bool = True) -> Path:
    """``folder`` checked to be (or to be creatable as) a writable folder, and created unless
    ``create`` is false (a check before any work is done); every problem is a
    :class:`BadInput` naming ``option`` and the folder."""
    folder = Path(folder)
    _check_folder(folder, folder, option, create)
    return folder


def prepare_output_file(path: str | os.PathLike, what: str = "the output",
                        option: str = "--out") -> Path:
    """``path`` checked to be a file that can be written (it is not a folder; its folder
    exists, or is created, and is writable) before any work is done, so that a command does
    not run only to fail at the end; every problem is a :class:`BadInput` naming ``option``
    and ``path``. ``what`` names the file in the message."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{option} {path}: is a directory (give a file name for {what})")
    _check_folder(path.parent, path, option, create=True)
    return path


def _check_folder(folder: Path, named: Path, option: str, create: bool) -> None:
    """The one output-path check (see :func:`prepare_output_folder`); messages name
    ``named``, the path the user gave."""
    for above in (folder, *folder.parents):
        if above.exists() and not above.is_dir():
            where = "exists and is not a directory" if above == named else \
                f"{str(above)!r} is a file, not a folder"
            raise BadInput(f"{option} {named}: {where}")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInput(f"{option} {named}: cannot create the folder: "
                           f"{exc.strerror or exc}") from None
    existing = next(p for p in (folder, *folder.parents, Path(".")) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"{option} {named}: cannot write to folder {str(existing)!r}: "
                       "Permission denied")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLock:
    """Holds ``folder/.bayescal.lock`` (this process's pid and host) while a run writes the
    folder, which is created if missing (:func:`prepare_output_folder`). A second run meets
    the lock and gets a :class:`BadInput` naming the holder; a lock left by a process of this
    host that no longer runs is taken over. Use as a context manager; on leaving, the lock
    file is removed, and so are the folders it created if the run left them empty (a failed
    run leaves nothing behind)."""

    def __init__(self, folder: str | os.PathLike, option: str = "--out") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.option = option
        self.held = False
        self.created: list[Path] = []

    def __enter__(self) -> FolderLock:
        self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        prepare_output_folder(self.folder, self.option)
        try:
            return self._take()
        except BaseException:
            self._remove_created()
            raise

    def _take(self) -> FolderLock:
        host = socket.gethostname()
        for _ in range(3):
            try:
                self._create(f"pid {os.getpid()}\nhost {host}\n")
            except FileExistsError:
                if self._stale(host):
                    self.path.unlink(missing_ok=True)
                    continue
                raise BadInput(f"{self.option} {self.folder}: in use by another bayescal run "
                               f"({self._holder()}); wait for it to end, or remove "
                               f"{self.path} if that run is gone") from None
            except OSError as exc:
                raise BadInput(f"{self.option} {self.folder}: cannot create the lock file "
                               f"{LOCK_NAME}: {exc.strerror or exc}") from None
            self.held = True
            return self
        raise BadInput(f"{self.option} {self.folder}: cannot take the lock {self.path}")

    def _create(self, text: str) -> None:
        """Create the lock file with ``text`` in one step (a hard link of a filled temporary
        file), so that no other run ever sees it empty; FileExistsError if it exists."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f"{LOCK_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, file_mode())
            os.link(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self.created:  # innermost first
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote something
                break
        self.created = []

    def _fields(self) -> dict[str, str]:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")[:4096]
        except OSError:
            return {}
        return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)

    def _holder(self) -> str:
        fields = self._fields()
        return f"pid {fields.get('pid', '?')} on host {fields.get('host', '?')}"

    def _stale(self, host: str) -> bool:
        """A lock of this host whose process has ended, or a lock file that names no
        holder (it was not written by bayescal)."""
        fields = self._fields()
        if not fields:
            return True
        pid = fields.get("pid", "")
        return fields.get("host") == host and pid.isdigit() and not _alive(int(pid))
