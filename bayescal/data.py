"""Experimental data: the long CSV format, validated and padded into ``(step, specimen)`` tensors.

One row per recorded point with columns ``specimen, time, strain, stress``, optionally
``temperature``, and any other column as a per-specimen label (constant within a specimen).
A load path has the same layout without ``stress``. Every problem in a file is reported as a
:class:`~bayescal.errors.BadInput` with one line naming the file, the line and the specimen.
"""

from __future__ import annotations

import csv
import math
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from bayescal.errors import BadInput
from bayescal.output import write_atomically

DTYPE = torch.float64
#: Largest data or load file read (bytes): ten million points of a few columns. A bigger file
#: is refused before it is read, rather than filling the memory.
MAX_FILE_BYTES = 1 << 30
#: Largest stress magnitude accepted (MPa): no engineering material comes near it, but stress
#: given in Pa (a factor 1e6) does, and such numbers overflow the fit.
MAX_STRESS = 1e5
_NUMERIC = ("time", "strain", "stress", "temperature")
_RESERVED = ("specimen",) + _NUMERIC


@dataclass(frozen=True, eq=False)
class Experiments:
    """Recorded histories of several specimens, padded to a common number of steps.

    Tensors have shape ``(step, specimen)``. A specimen shorter than the longest is padded at
    the end by repeating its last time, strain and temperature (so padded steps have zero
    increments); padded stress is NaN and ``mask`` is False there. ``stress`` is None for a
    load path. ``labels`` maps each label column to one value per specimen (float when the
    whole column is numeric, else str).
    """

    specimens: tuple[str, ...]
    time: torch.Tensor
    strain: torch.Tensor
    stress: torch.Tensor | None
    mask: torch.Tensor
    temperature: torch.Tensor | None
    labels: dict[str, tuple]
    source: str

    @property
    def n_specimens(self) -> int:
        return len(self.specimens)

    @property
    def n_steps(self) -> int:
        return self.time.shape[0]

    @property
    def n_points(self) -> tuple[int, ...]:
        """Number of recorded (unpadded) points of each specimen."""
        return tuple(int(n) for n in self.mask.sum(dim=0))

    def select(self, ids: Sequence[str]) -> Experiments:
        """The specimens ``ids`` in that order, trimmed to the longest of them."""
        index = {sid: j for j, sid in enumerate(self.specimens)}
        missing = [sid for sid in ids if sid not in index]
        if missing:
            raise BadInput(f"{self.source}: no specimen {', '.join(map(repr, missing))} "
                           f"(specimens: {', '.join(self.specimens)})")
        cols = [index[sid] for sid in ids]
        n = max((self.n_points[j] for j in cols), default=0)

        def take(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[:n, cols]

        return replace(
            self,
            specimens=tuple(ids),
            time=take(self.time),
            strain=take(self.strain),
            stress=take(self.stress),
            mask=take(self.mask),
            temperature=take(self.temperature),
            labels={name: tuple(values[j] for j in cols) for name, values in self.labels.items()},
        )

    def to_frame(self):
        """The long format (recorded points only) as a pandas DataFrame."""
        import pandas as pd  # optional dependency, only needed here

        return pd.DataFrame(list(self._rows()), columns=self._header())

    def write_csv(self, path: str | os.PathLike) -> None:
        """Write the long CSV format atomically (see :func:`write_experiments`)."""
        write_experiments(self, path)

    def _columns(self) -> dict[str, torch.Tensor]:
        present = {"time": self.time, "strain": self.strain,
                   "stress": self.stress, "temperature": self.temperature}
        return {name: x for name, x in present.items() if x is not None}

    def _header(self) -> list[str]:
        return ["specimen", *self._columns(), *self.labels]

    def _rows(self) -> Iterator[list]:
        columns = [x.T.tolist() for x in self._columns().values()]
        for j, (sid, n) in enumerate(zip(self.specimens, self.n_points)):
            labels = [values[j] for values in self.labels.values()]
            for i in range(n):
                yield [sid, *(column[j][i] for column in columns), *labels]


def read_experiments(path: str | os.PathLike) -> Experiments:
    """Read and validate a long CSV of measured stress histories."""
    table = _read_table(Path(path), required=("specimen", "time", "strain", "stress"))
    return assemble_experiments(str(path), table)


def read_load_path(path: str | os.PathLike, specimens: Sequence[str] | None = None) -> Experiments:
    """Read a load path (the data layout without ``stress``; a ``stress`` column is ignored).

    Without a ``specimen`` column the file is one path: replicated under the ids
    ``specimens`` if given, else named ``"path"``. With a ``specimen`` column each id is its
    own path, and ``specimens``, if given, selects and orders them.
    """
    table = _read_table(Path(path), required=("time", "strain"), ignored=("stress",))
    has_ids = table.has_ids
    if not has_ids and specimens is not None:
        (single,) = table.specimens
        table = replace(table, specimens=[replace(single, id=sid) for sid in specimens])
    experiments = assemble_experiments(str(path), table)
    if has_ids and specimens is not None:
        return experiments.select(specimens)
    return experiments


def has_specimen_column(path: str | os.PathLike) -> bool:
    """Whether a (validated) CSV file's header names a ``specimen`` column."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.reader(f):
            if any(cell.strip() for cell in row):
                return "specimen" in (cell.strip() for cell in row)
    return False


def write_experiments(experiments: Experiments, path: str | os.PathLike) -> None:
    """Write ``experiments`` in the long CSV format (recorded points only), atomically."""
    write_table(path, experiments._header(), experiments._rows())


def write_table(path: str | os.PathLike, header: Sequence[str], rows: Iterable) -> None:
    """Write a CSV table atomically (:func:`bayescal.output.write_atomically`), so that an
    interrupted write never leaves a half-written or missing file."""

    def write(f) -> None:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)

    write_atomically(path, write, "w", newline="", encoding="utf-8")


#: Kept for callers that open their own temporary file: :func:`bayescal.output.fill_temporary`.


# ----------------------------------------------------------------------------- reading


@dataclass
class SpecimenRecord:
    """The raw rows of one specimen while reading."""

    id: str
    first_line: int
    labels: dict[str, str]
    columns: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class SpecimenTable:
    """A validated file: its specimens in order of appearance."""

    specimens: list[SpecimenRecord]
    numeric: tuple[str, ...]
    labels: tuple[str, ...]
    has_ids: bool


def _error(path: Path, message: str, line: int | None = None, specimen: str | None = None) -> BadInput:
    where = str(path)
    if line is not None:
        where += f" line {line}"
    if specimen is not None:
        where += f" (specimen {specimen!r})"
    return BadInput(f"{where}: {message}")


def check_input_file(path: Path, limit: int = MAX_FILE_BYTES) -> None:
    """A :class:`BadInput` unless ``path`` is a regular file of at most ``limit`` bytes:
    a device (``/dev/zero``) or a pipe would be read without end."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise BadInput(f"{path}: not a regular file")
    if info.st_size > limit:
        raise BadInput(f"{path}: {info.st_size} bytes is more than the {limit} bytes a data "
                       "file may have")


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows, each with its line number, of a CSV file."""
    check_input_file(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, [cell.strip() for cell in row])
                    for row in reader if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise _error(path, "file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise _error(path, f"cannot read: {exc}") from None
    if not rows:
        raise _error(path, "file is empty")
    (_, header), *data = rows
    if not data:
        raise _error(path, "has a header but no data rows")
    return header, data


def _check_header(path: Path, header: list[str], required: tuple[str, ...]) -> None:
    for position, name in enumerate(header, start=1):
        if not name:
            raise _error(path, f"column {position} has no name", line=1)
        if header.index(name) != position - 1:
            raise _error(path, f"duplicate column {name!r}", line=1)
    for name in required:
        if name not in header:
            raise _error(path, f"missing required column {name!r} (columns: {', '.join(header)})")


def _number(text: str) -> float | None:
    """``text`` as a finite float, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _same_label(a: str, b: str) -> bool:
    """Equal label texts, or texts of the same number (``1e-3`` and ``0.001``)."""
    number = _number(a)
    return a == b or (number is not None and number == _number(b))


def _read_table(path: Path, required: tuple[str, ...], ignored: tuple[str, ...] = ()) -> SpecimenTable:
    """Read and validate a long CSV file; the one validation path of every reader."""
    header, rows = _read_rows(path)
    _check_header(path, header, required)
    column = {name: i for i, name in enumerate(header)}
    numeric = tuple(c for c in _NUMERIC if c in column and c not in ignored)
    labels = tuple(c for c in header if c not in _RESERVED and c not in ignored)
    has_ids = "specimen" in column

    specimens: dict[str, SpecimenRecord] = {}
    current: SpecimenRecord | None = None
    for line, row in rows:
        if len(row) != len(header):
            raise _error(path, f"expected {len(header)} fields, found {len(row)}", line)
        sid = row[column["specimen"]] if has_ids else "path"
        shown = sid if has_ids else None
        if not sid:
            raise _error(path, "specimen id is empty", line)
        if current is None or sid != current.id:
            if sid in specimens:
                raise _error(path, "specimen appears again after other specimens "
                                   "(its rows must be contiguous)", line, shown)
            if current is not None:
                _check_length(path, current, has_ids)
            current = specimens[sid] = SpecimenRecord(
                sid, line, {c: row[column[c]] for c in labels}, {c: [] for c in numeric})
        for name in numeric:
            value = _number(row[column[name]])
            if value is None:
                raise _error(path, f"{name} {row[column[name]]!r} is not a finite number", line, shown)
            if name == "stress" and abs(value) > MAX_STRESS:
                raise _error(path, f"stress {row[column[name]]!r} is beyond {MAX_STRESS:g} "
                                   "MPa (stress must be in MPa; Pa or psi?)", line, shown)
            current.columns[name].append(value)
        times = current.columns["time"]
        if len(times) > 1 and times[-1] <= times[-2]:
            raise _error(path, f"time {times[-1]!r} is not greater than the previous {times[-2]!r}",
                         line, shown)
        for name in labels:
            first, value = current.labels[name], row[column[name]]
            if not _same_label(first, value):
                raise _error(path, f"label {name!r} changes from {first!r} to {value!r} "
                                   "within the specimen", line, shown)
    _check_length(path, current, has_ids)
    return SpecimenTable(list(specimens.values()), numeric, labels, has_ids)


def _check_length(path: Path, specimen: SpecimenRecord, has_ids: bool) -> None:
    n = len(specimen.columns["time"])
    if n < 2:
        raise _error(path, f"needs at least 2 points, has {n}", specimen.first_line,
                     specimen.id if has_ids else None)


def _label_column(raw: list[str]) -> tuple:
    """Label values as floats when every value is numeric, else as the strings in the file."""
    numbers = [_number(text) for text in raw]
    return tuple(raw) if None in numbers else tuple(numbers)


def assemble_experiments(source: str, table: SpecimenTable) -> Experiments:
    """Pad the specimens of a validated table into ``(step, specimen)`` tensors."""
    counts = torch.tensor([len(s.columns["time"]) for s in table.specimens], dtype=torch.long)
    n_steps = int(counts.max()) if len(counts) else 0
    mask = torch.arange(n_steps).unsqueeze(-1) < counts

    def padded(name: str) -> torch.Tensor:
        out = torch.empty(n_steps, len(table.specimens), dtype=DTYPE)
        for j, specimen in enumerate(table.specimens):
            values = torch.tensor(specimen.columns[name], dtype=DTYPE)
            out[: len(values), j] = values
            out[len(values):, j] = torch.nan if name == "stress" else values[-1]
        return out

    columns = {name: padded(name) for name in table.numeric}
    return Experiments(
        specimens=tuple(s.id for s in table.specimens),
        time=columns["time"],
        strain=columns["strain"],
        stress=columns.get("stress"),
        mask=mask,
        temperature=columns.get("temperature"),
        labels={name: _label_column([s.labels[name] for s in table.specimens])
                for name in table.labels},
        source=source,
    )
