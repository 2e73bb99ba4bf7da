"""Importers: test files of other tools converted to the data CSV (:mod:`bayescal.data`).

MatCal-style tension test files (one specimen a file, as in the MatCal documentation)::

    {'temperature':534.67, 'engineering_strain_rate':0.01 }
    time, displacement, load, engineering_strain, engineering_stress
    9.9997,1.1e-06,9.1859,4.41e-06,0.739
    ...

Line 1 is a Python dict of state values (read with :func:`ast.literal_eval`, never ``eval``);
a file whose line 1 is a header instead has no state values. The header needs ``time``,
``engineering_strain`` and ``engineering_stress``; other columns are ignored. Each curve is
cut to its loading part (:func:`loading_range`), converted to true strain and true stress
(:func:`true_strain`, :func:`true_stress`) in MPa, and its state values become per-specimen
columns: ``temperature`` (Rankine) the data's ``temperature`` column in K,
``engineering_strain_rate`` the label ``strain_rate``, any other key a label of its own name.
Every problem is a :class:`~bayescal.errors.BadInput` with one line naming the file and, where
it applies, the line.
"""

from __future__ import annotations

import ast
import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bayescal.data import (
    MAX_STRESS,
    Experiments,
    SpecimenRecord,
    SpecimenTable,
    assemble_experiments,
    check_input_file,
    read_experiments,
    write_experiments,
)
from bayescal.errors import BadInput
from bayescal.output import prepare_output_file

#: MPa per ksi (1000 lbf/in^2 = 4.4482216152605 N / (0.0254 m)^2).
KSI_TO_MPA = 6.894757293168361
#: Kelvin per degree Rankine.
RANKINE_TO_KELVIN = 5.0 / 9.0
#: MPa per unit of each accepted stress unit.
STRESS_UNITS = {"ksi": KSI_TO_MPA, "MPa": 1.0}
#: Columns every test file needs (after stripping whitespace and a leading '#').
REQUIRED = ("time", "engineering_strain", "engineering_stress")
#: State keys written under another name.
RENAMED = {"engineering_strain_rate": "strain_rate"}
#: A leading prefix removed from file stems to make specimen ids.
STEM_PREFIX = "cleaned_"
_RESERVED = ("specimen", "time", "strain", "stress")


@dataclass(frozen=True)
class Curve:
    """One test file, cut and converted: ``time`` (s), ``strain``, ``stress`` (MPa; true
    values unless read with ``engineering=True``), ``temperature`` (K) or None, ``labels``
    (the other state values, renamed), and how many points were read and dropped."""

    specimen: str
    path: Path
    time: tuple[float, ...]
    strain: tuple[float, ...]
    stress: tuple[float, ...]
    temperature: float | None
    labels: dict[str, float | str]
    first_line: int
    n_read: int
    n_preload: int
    n_necking: int


@dataclass(frozen=True)
class Imported:
    """The result of :func:`import_matcal`: the data as read back from ``out``, the curves
    it was made from, and the options used."""

    experiments: Experiments
    curves: tuple[Curve, ...]
    directory: Path
    pattern: str
    out: Path
    engineering: bool
    trim: bool


# ------------------------------------------------------------------------------- conversions


def true_strain(engineering_strain: float) -> float:
    """``ln(1 + e)``."""
    return math.log1p(engineering_strain)


def true_stress(engineering_stress: float, engineering_strain: float) -> float:
    """``s (1 + e)`` (constant volume)."""
    return engineering_stress * (1.0 + engineering_strain)


def loading_range(strain: Sequence[float], stress: Sequence[float], trim: bool = True
                  ) -> tuple[int, int]:
    """The points ``[start, end)`` of a tension curve that are kept.

    ``peak`` is the first point of maximum engineering stress (the onset of necking).
    Pre-load: the loading starts at the *last* point of minimum engineering strain among the
    points up to the peak, so that up to the peak the kept strain never falls below its
    starting value; the points before it (slack take-up, extensometer settling, a pause before loading) are
    dropped. Later small dips of strain (measurement noise) are kept. With ``trim`` the curve
    ends at the peak (included), else at its last point.
    """
    peak = max(range(len(stress)), key=stress.__getitem__)
    lowest = min(strain[: peak + 1])
    start = max(i for i in range(peak + 1) if strain[i] == lowest)
    return start, (peak + 1 if trim else len(strain))


# ----------------------------------------------------------------------------------- reading


def _error(path: Path, message: str, line: int | None = None) -> BadInput:
    return BadInput(f"{path}{'' if line is None else f' line {line}'}: {message}")


def specimen_id(path: Path) -> str:
    """The file stem without a leading ``cleaned_``."""
    stem = path.stem
    return stem[len(STEM_PREFIX):] if stem.startswith(STEM_PREFIX) else stem


def _lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of ``path`` with their line numbers."""
    check_input_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise _error(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(path, f"cannot read: {exc}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise _error(path, "file is empty")
    return lines


def _state(path: Path, line: int, text: str) -> dict | None:
    """Line 1 as a state dict, or None where it is not a Python literal (then a header)."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if text.lstrip().startswith("{"):
            raise _error(path, "the state line is not a Python dict literal of numbers and "
                               "texts", line) from None
        return None
    if not isinstance(value, dict):
        raise _error(path, f"the state line is a {type(value).__name__}, not a dict (nor a "
                           "header line)", line)
    return value


def _split_state(path: Path, line: int, state: dict) -> tuple[float | None, dict]:
    """Temperature in K (or None) and the other state values as labels."""
    temperature = None
    labels: dict[str, float | str] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key.strip():
            raise _error(path, f"state key {key!r} is not a name", line)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _error(path, f"state value {key}={value!r} is not a number or text", line)
        if isinstance(value, int):
            try:
                value = float(value)
            except OverflowError:
                raise _error(path, f"state value {key}={_shown(value)} is too large a number",
                             line) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise _error(path, f"state value {key}={value!r} is not a finite number", line)
        if key == "temperature":
            if isinstance(value, str) or value <= 0:
                raise _error(path, f"temperature {value!r} is not a positive number "
                                   "(Rankine)", line)
            temperature = value * RANKINE_TO_KELVIN
            continue
        name = RENAMED.get(key, key)
        if name in _RESERVED:
            raise _error(path, f"state key {key!r} clashes with the data column {name!r}", line)
        if name in labels:
            raise _error(path, f"state keys {origin[name]!r} and {key!r} are both the label "
                               f"{name!r}", line)
        labels[name] = value
        origin[name] = key
    return temperature, labels


def _shown(value: int) -> str:
    """A long integer as its first digits and its length."""
    text = str(value)
    return text if len(text) <= 20 else f"{text[:12]}... ({len(text)} digits)"


def _header(path: Path, line: int, text: str) -> tuple[dict[str, int], int]:
    """Column positions by name (names stripped of whitespace and a leading '#') and the
    number of columns."""
    names = [cell.strip().lstrip("#").strip() for cell in next(csv.reader([text]))]
    column: dict[str, int] = {}
    for position, name in enumerate(names):
        if name in REQUIRED and name in column:
            raise _error(path, f"duplicate column {name!r}", line)
        column.setdefault(name, position)
    for name in REQUIRED:
        if name not in column:
            raise _error(path, f"missing required column {name!r} (columns: "
                               f"{', '.join(names)})", line)
    return column, len(names)


def read_matcal_file(path: str | os.PathLike, stress_unit: str = "ksi",
                     engineering: bool = False, trim: bool = True) -> Curve:
    """Read, cut (:func:`loading_range`) and convert one MatCal-style test file."""
    path = Path(path)
    if stress_unit not in STRESS_UNITS:
        raise BadInput(f"stress unit {stress_unit!r} is not one of {', '.join(STRESS_UNITS)}")
    lines = _lines(path)
    (first, text), rest = lines[0], lines[1:]
    state = _state(path, first, text)
    temperature, labels = (None, {}) if state is None else _split_state(path, first, state)
    if state is not None:
        if not rest:
            raise _error(path, "has a state line but no header line")
        (first, text), rest = rest[0], rest[1:]
    column, width = _header(path, first, text)
    if not rest:
        raise _error(path, "has a header but no data rows")

    numbers: list[tuple[int, float, float, float]] = []
    for line, text in rest:
        row = [cell.strip() for cell in next(csv.reader([text]))]
        if len(row) != width:
            raise _error(path, f"expected {width} fields, found {len(row)}", line)
        values = []
        for name in REQUIRED:
            cell = row[column[name]]
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise _error(path, f"{name} {cell!r} is not a finite number", line)
            values.append(value)
        numbers.append((line, *values))

    lines_, time, strain, stress = zip(*numbers)
    start, end = loading_range(strain, stress, trim)
    if end - start < 2:
        raise _error(path, f"{end - start} point{'s' * (end - start != 1)} left after "
                           "dropping pre-load points"
                           f"{' and trimming at maximum stress' if trim else ''} "
                           "(needs at least 2)")
    for i in range(start + 1, end):
        if time[i] <= time[i - 1]:
            raise _error(path, f"time {time[i]!r} is not greater than the previous "
                               f"{time[i - 1]!r}", lines_[i])
    scale = STRESS_UNITS[stress_unit]
    if engineering:
        out_strain = strain[start:end]
        out_stress = tuple(scale * s for s in stress[start:end])
    else:
        for i in range(start, end):
            if strain[i] <= -1.0:
                raise _error(path, f"engineering_strain {strain[i]!r} is not above -1", lines_[i])
        out_strain = tuple(true_strain(e) for e in strain[start:end])
        out_stress = tuple(scale * true_stress(s, e)
                           for s, e in zip(stress[start:end], strain[start:end]))
    for i, value in enumerate(out_stress, start=start):
        if not abs(value) <= MAX_STRESS:
            raise _error(path, f"engineering_stress {stress[i]!r} {stress_unit} is beyond "
                               f"{MAX_STRESS:g} MPa (is --stress-unit right?)", lines_[i])
    return Curve(specimen=specimen_id(path), path=path, time=time[start:end],
                 strain=tuple(out_strain), stress=out_stress, temperature=temperature,
                 labels=labels, first_line=lines_[start], n_read=len(numbers),
                 n_preload=start, n_necking=len(numbers) - end)


def matcal_files(directory: str | os.PathLike, pattern: str = "*.csv") -> list[Path]:
    """The files in ``directory`` matching ``pattern``, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        problem = "not a directory" if directory.exists() else "no such directory"
        raise BadInput(f"{directory}: {problem}")
    files = sorted((p for p in directory.glob(pattern) if p.is_file()), key=lambda p: p.name)
    if not files:
        raise BadInput(f"{directory}: no files match {pattern!r} (choose others with --glob)")
    return files


def read_matcal_curves(directory: str | os.PathLike, stress_unit: str = "ksi",
                       engineering: bool = False, trim: bool = True, pattern: str = "*.csv"
                       ) -> tuple[Curve, ...]:
    """Every matching file of ``directory`` as a :class:`Curve`, checked to carry the same
    state keys and distinct specimen ids."""
    curves = tuple(read_matcal_file(path, stress_unit, engineering, trim)
                   for path in matcal_files(directory, pattern))
    first = curves[0]
    seen: dict[str, Path] = {}
    for curve in curves:
        if curve.specimen in seen:
            raise _error(curve.path, f"specimen id {curve.specimen!r} is also the id of "
                                     f"{seen[curve.specimen].name}")
        seen[curve.specimen] = curve.path
        keys, first_keys = _state_names(curve), _state_names(first)
        if keys != first_keys:
            raise _error(curve.path, f"state values {_listing(keys)} differ from "
                                     f"{_listing(first_keys)} of {first.path.name}")
    return curves


def _state_names(curve: Curve) -> list[str]:
    return (["temperature"] if curve.temperature is not None else []) + sorted(curve.labels)


def _listing(names: list[str]) -> str:
    return "(" + (", ".join(names) or "none") + ")"


def experiments_from_curves(curves: Sequence[Curve], source: str) -> Experiments:
    """The curves as :class:`~bayescal.data.Experiments` (padded like every data file)."""
    has_temperature = bool(curves) and curves[0].temperature is not None
    numeric = ("time", "strain", "stress") + (("temperature",) if has_temperature else ())
    label_names = tuple(curves[0].labels) if curves else ()
    specimens = []
    for curve in curves:
        columns = {"time": list(curve.time), "strain": list(curve.strain),
                   "stress": list(curve.stress)}
        if has_temperature:
            columns["temperature"] = [curve.temperature] * len(curve.time)
        labels = {name: (repr(v) if isinstance(v, float) else v)
                  for name in label_names for v in [curve.labels[name]]}
        specimens.append(SpecimenRecord(curve.specimen, curve.first_line, labels, columns))
    return assemble_experiments(source, SpecimenTable(specimens, numeric, label_names, has_ids=True))


def read_matcal(directory: str | os.PathLike, stress_unit: str = "ksi",
                engineering: bool = False, trim: bool = True, pattern: str = "*.csv"
                ) -> Experiments:
    """A folder of MatCal-style test files as data: one specimen a file (sorted by name),
    cut at pre-load and (with ``trim``) at maximum engineering stress, true strain and true
    stress in MPa (engineering values with ``engineering``), temperature in K and the other
    state values as labels. See the module docstring."""
    curves = read_matcal_curves(directory, stress_unit, engineering, trim, pattern)
    return experiments_from_curves(curves, str(directory))


# ----------------------------------------------------------------------------------- writing


def import_matcal(directory: str | os.PathLike, out: str | os.PathLike, stress_unit: str = "ksi",
                  engineering: bool = False, trim: bool = True, pattern: str = "*.csv"
                  ) -> Imported:
    """:func:`read_matcal` written to ``out`` atomically, then read back and validated with
    :func:`~bayescal.data.read_experiments` (the returned experiments are the read-back)."""
    out = prepare_output_file(out, "the data CSV")
    curves = read_matcal_curves(directory, stress_unit, engineering, trim, pattern)
    write_experiments(experiments_from_curves(curves, str(directory)), out)
    experiments = read_experiments(out)
    if (experiments.specimens != tuple(c.specimen for c in curves)
            or experiments.n_points != tuple(len(c.time) for c in curves)):
        raise RuntimeError(f"{out}: the written data does not read back as written")
    return Imported(experiments, curves, Path(directory), pattern, out, engineering, trim)


def _span(counts: Sequence[int]) -> str:
    low, high = min(counts), max(counts)
    return f"{low}" if low == high else f"{low}-{high}"


def format_import(result: Imported) -> str:
    """A short summary: specimens and points per strain rate, points dropped, where written."""
    e = result.experiments
    counts = e.n_points
    rates = e.labels.get("strain_rate")
    groups: dict[object, list[int]] = {}
    for j, n in enumerate(counts):
        groups.setdefault("all" if rates is None else rates[j], []).append(n)
    order = sorted((k for k in groups if not isinstance(k, str)))
    order += sorted(k for k in groups if isinstance(k, str))
    rows = [("strain_rate", "specimens", "points")] + [
        (k if isinstance(k, str) else f"{k:g}", str(len(groups[k])),
         _span(groups[k])) for k in order]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    table = ["  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2]]) for r in rows]
    preload = sum(c.n_preload for c in result.curves)
    necking = sum(c.n_necking for c in result.curves)
    kind = "engineering" if result.engineering else "true"
    what = f"{kind} strain, {kind} stress in MPa"
    if e.temperature is not None:
        low, high = float(e.temperature.min()), float(e.temperature.max())
        what += f", temperature {low:.2f} K" if low == high else \
            f", temperature {low:.2f}-{high:.2f} K"
    if e.labels:
        what += f", labels {', '.join(e.labels)}"
    dropped = f"dropped {preload} pre-load points"
    dropped += f" and {necking} points after maximum stress" if result.trim else ""
    return "\n".join([
        f"read {len(result.curves)} files matching {result.pattern!r} in {result.directory}; "
        f"{dropped}",
        *table,
        f"wrote {result.out} ({e.n_specimens} specimens, {sum(counts)} points, "
        f"{_span(counts)} a specimen; {what})",
    ])
