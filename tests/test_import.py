"""`bayescal import matcal`: conversions, pre-load and necking cuts, errors, the real files."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from bayescal.cli import COMMANDS, main
from bayescal.data import read_experiments
from bayescal.errors import BadInput
from bayescal.importers import (
    KSI_TO_MPA,
    loading_range,
    read_matcal,
    read_matcal_file,
)
from tests.test_cli import run

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "matcal_304L_rate"
SMALL_TENSION = REAL / "small_tension"
ASTM = REAL / "astm_e8_tension"

# Two pre-load points, the minimum strain twice (the curve starts at the second), a peak of
# engineering stress at 100 ksi and one necking point after it.
TINY = """{'temperature': 540.0, 'engineering_strain_rate': 0.001, 'heat': 'A'}
time, load, engineering_strain, engineering_stress
0.0, 7, 0.002, 1.0
1.0, 7, 0.0, 2.0
2.0, 7, 0.001, 3.0
3.0, 7, 0.0, 4.0
4.0, 7, 0.1, 80.0
5.0, 7, 0.2, 100.0
6.0, 7, 0.3, 90.0
"""


def folder(tmp_path, files: dict[str, str]) -> Path:
    directory = tmp_path / "tests"
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


# ------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("strain, stress, trim, expected", [
    ([0.0, 0.1, 0.2, 0.3], [0, 5, 9, 7], True, (0, 3)),        # clean: cut after the peak
    ([0.0, 0.1, 0.2, 0.3], [0, 5, 9, 7], False, (0, 4)),       # --no-trim keeps it all
    ([2e-3, 0.0, 1e-3, 0.0, 0.1, 0.2, 0.3], [1, 2, 3, 4, 80, 100, 90], True, (3, 6)),
    ([0.0, 0.1, 0.2, 0.3], [5, 5, 4, 3], True, (0, 1)),        # first of equal maxima
    ([0.0, 0.1, -1e-3, 0.3, 0.2], [0, 5, 6, 9, 1], True, (2, 4)),
    ([0.0, 0.1, 0.2, -0.5], [0, 5, 9, 1], True, (0, 3)),       # after the peak: not searched
    ([0.0, 0.1, 0.09, 0.3], [0, 5, 6, 9], True, (0, 4)),       # a later small dip is kept
])
def test_loading_range_starts_at_the_last_minimum_strain_before_the_peak(strain, stress, trim,
                                                                         expected):
    assert loading_range(strain, stress, trim) == expected


def test_tiny_file_exact_conversions(tmp_path):
    directory = folder(tmp_path, {"cleaned_T1.csv": TINY})
    e = read_matcal(directory)
    assert e.specimens == ("T1",) and e.n_points == (3,)
    assert e.time[:, 0].tolist() == [3.0, 4.0, 5.0]            # recorded times kept
    assert e.strain[:, 0].tolist() == [0.0, math.log1p(0.1), math.log1p(0.2)]
    assert e.stress[:, 0].tolist() == [4.0 * KSI_TO_MPA, 80.0 * 1.1 * KSI_TO_MPA,
                                       100.0 * 1.2 * KSI_TO_MPA]
    assert e.stress[2, 0].item() == pytest.approx(827.3708751802033, rel=1e-15)
    assert e.temperature[:, 0].tolist() == pytest.approx([300.0] * 3, rel=1e-15)  # 540 R
    assert e.labels == {"strain_rate": (0.001,), "heat": ("A",)}


def test_tiny_file_options(tmp_path):
    path = folder(tmp_path, {"T1.csv": TINY}) / "T1.csv"
    curve = read_matcal_file(path, stress_unit="MPa", engineering=True, trim=False)
    assert curve.specimen == "T1" and curve.first_line == 6
    assert (curve.n_read, curve.n_preload, curve.n_necking) == (7, 3, 0)
    assert curve.time == (3.0, 4.0, 5.0, 6.0)
    assert curve.strain == (0.0, 0.1, 0.2, 0.3)
    assert curve.stress == (4.0, 80.0, 100.0, 90.0)
    trimmed = read_matcal_file(path, stress_unit="MPa")
    assert (trimmed.n_preload, trimmed.n_necking) == (3, 1)
    assert trimmed.stress == (4.0, 88.0, 120.0)


def test_a_file_without_state_line_and_a_hash_header(tmp_path):
    text = ("# time ,engineering_stress,extra, engineering_strain\n"
            "0,0,x,0\n1,10,y,0.01\n2,5,z,0.02\n")
    e = read_matcal(folder(tmp_path, {"a.dat": text}), pattern="*.dat", stress_unit="MPa")
    assert e.specimens == ("a",) and e.temperature is None and e.labels == {}
    assert e.strain[:, 0].tolist() == [0.0, math.log1p(0.01)]
    assert e.stress[:, 0].tolist() == [0.0, 10.0 * 1.01]


def test_cli_writes_a_data_file_that_reads_back(tmp_path, capsys):
    other = TINY.replace("0.001", "0.01").replace("540.0", "534.67")
    directory = folder(tmp_path, {"cleaned_T1.csv": TINY, "cleaned_T2.csv": other,
                                  "notes.txt": "not a test file"})
    out = tmp_path / "sub" / "data.csv"
    status, stdout, err = run(capsys, "import", "matcal", directory, "--out", out)
    assert status == 0 and err == ""
    assert stdout.splitlines() == [
        f"read 2 files matching '*.csv' in {directory}; dropped 6 pre-load points and 2 points "
        "after maximum stress",
        "strain_rate  specimens  points",
        "0.001                1  3",
        "0.01                 1  3",
        f"wrote {out} (2 specimens, 6 points, 3 a specimen; true strain, true stress in MPa, "
        "temperature 297.04-300.00 K, labels strain_rate, heat)",
    ]
    e = read_experiments(out)
    assert e.specimens == ("T1", "T2")
    assert e.labels == {"strain_rate": (0.001, 0.01), "heat": ("A", "A")}
    assert e.temperature[0].tolist() == pytest.approx([300.0, 534.67 * 5 / 9], rel=1e-15)
    assert e.stress[:, 1].tolist() == [4.0 * KSI_TO_MPA, 88.0 * KSI_TO_MPA,
                                       120.0 * KSI_TO_MPA]
    with open(out, newline="") as f:
        assert next(csv.reader(f)) == ["specimen", "time", "strain", "stress", "temperature",
                                       "strain_rate", "heat"]
    assert "import" in COMMANDS


# ----------------------------------------------------------------------------------- errors

STATE = "{'temperature': 534.67, 'engineering_strain_rate': 0.01}\n"
HEADER = "time, engineering_strain, engineering_stress\n"
ROWS = "0, 0, 0\n1, 0.01, 50\n2, 0.02, 60\n"


@pytest.mark.parametrize("text, message", [
    ("", "file is empty"),
    ("\n  \n", "file is empty"),
    ("{'temperature': 534.67,\n" + HEADER + ROWS,
     "line 1: the state line is not a Python dict literal of numbers and texts"),
    ("{'temperature': __import__('os')}\n" + HEADER + ROWS,
     "line 1: the state line is not a Python dict literal of numbers and texts"),
    ("[534.67, 0.01]\n" + HEADER + ROWS, "line 1: the state line is a list, not a dict (nor a "
                                         "header line)"),
    ("0, 0, 0\n1, 0.01, 50\n", "line 1: the state line is a tuple, not a dict (nor a header "
                               "line)"),
    ("{'temperature': 'warm'}\n" + HEADER + ROWS,
     "line 1: temperature 'warm' is not a positive number (Rankine)"),
    ("{'engineering_strain_rate': 0.01, 'strain_rate': 0.01}\n" + HEADER + ROWS,
     "line 1: state keys 'engineering_strain_rate' and 'strain_rate' are both the label "
     "'strain_rate'"),
    ("{'stress': 1}\n" + HEADER + ROWS, "line 1: state key 'stress' clashes with the data "
                                        "column 'stress'"),
    ("{'heat': None}\n" + HEADER + ROWS, "line 1: state value heat=None is not a number or text"),
    (STATE, "has a state line but no header line"),
    (STATE + HEADER, "has a header but no data rows"),
    (STATE + "time, engineering_strain, load\n" + ROWS,
     "line 2: missing required column 'engineering_stress' (columns: time, "
     "engineering_strain, load)"),
    (STATE + "time, time, engineering_strain, engineering_stress\n0, 0, 0, 0\n",
     "line 2: duplicate column 'time'"),
    (STATE + HEADER + "0, 0, 0\n1, 0.01\n", "line 4: expected 3 fields, found 2"),
    (STATE + HEADER + "0, 0, 0\n1, 0.01, abc\n",
     "line 4: engineering_stress 'abc' is not a finite number"),
    (STATE + HEADER + "0, 0, 0\n1, nan, 50\n",
     "line 4: engineering_strain 'nan' is not a finite number"),
    (STATE + HEADER + "0, 0, 90\n1, 0.01, 50\n2, 0.02, 60\n",
     "1 point left after dropping pre-load points and trimming at maximum stress (needs at "
     "least 2)"),
    (STATE + HEADER + "0, 0, 0\n1, 0.01, 50\n1, 0.02, 60\n",
     "line 5: time 1.0 is not greater than the previous 1.0"),
    (STATE + HEADER + "0, 0, 0\n1, -1.5, 50\n2, -1.0, 60\n3, -0.5, 70\n",
     "line 4: engineering_strain -1.5 is not above -1"),
])
def test_a_bad_file_exits_2_with_one_line_naming_it(tmp_path, capsys, text, message):
    directory = folder(tmp_path, {"good.csv": STATE + HEADER + ROWS, "z_bad.csv": text})
    status, out, err = run(capsys, "import", "matcal", directory, "--out", tmp_path / "o.csv")
    assert status == 2 and out == ""
    where = f"{directory / 'z_bad.csv'}{' ' if message.startswith('line') else ': '}"
    assert err == f"bayescal: error: {where}{message}\n"
    assert not (tmp_path / "o.csv").exists()


def test_time_going_back_only_in_the_dropped_pre_load_is_accepted(tmp_path):
    text = STATE + HEADER + "5, 0.001, 1\n0, 0, 0\n1, 0.01, 50\n2, 0.02, 60\n3, 0.03, 55\n"
    e = read_matcal(folder(tmp_path, {"a.csv": text}))
    assert e.time[:, 0].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("files, pattern, message", [
    ({"a.csv": STATE + HEADER + ROWS, "b.csv": HEADER + ROWS}, "*.csv",
     "{dir}/b.csv: state values (none) differ from (temperature, strain_rate) of a.csv"),
    ({"cleaned_a.csv": STATE + HEADER + ROWS, "a.csv": STATE + HEADER + ROWS}, "*.csv",
     "{dir}/cleaned_a.csv: specimen id 'a' is also the id of a.csv"),
    ({"a.csv": STATE + HEADER + ROWS}, "*.dat",
     "{dir}: no files match '*.dat' (choose others with --glob)"),
])
def test_folder_errors(tmp_path, capsys, files, pattern, message):
    directory = folder(tmp_path, files)
    status, out, err = run(capsys, "import", "matcal", directory, "--glob", pattern,
                           "--out", tmp_path / "o.csv")
    assert (status, out) == (2, "")
    assert err == f"bayescal: error: {message.format(dir=directory)}\n"


def test_missing_folder_unreadable_file_and_usage(tmp_path, capsys):
    status, _, err = run(capsys, "import", "matcal", tmp_path / "nope", "--out", tmp_path / "o.csv")
    assert status == 2 and err == f"bayescal: error: {tmp_path / 'nope'}: no such directory\n"
    directory = folder(tmp_path, {})
    (directory / "bin.csv").write_bytes(b"\xff\xfe\x00\x81garbage")
    status, _, err = run(capsys, "import", "matcal", directory, "--out", tmp_path / "o.csv")
    assert status == 2
    assert err.startswith(f"bayescal: error: {directory / 'bin.csv'}: cannot read: ")
    assert err.count("\n") == 1
    status, _, err = run(capsys, "import", "instron", directory, "--out", tmp_path / "o.csv")
    assert status == 2 and "invalid choice: 'instron'" in err
    with pytest.raises(BadInput, match="stress unit 'psi' is not one of ksi, MPa"):
        read_matcal_file(directory / "bin.csv", stress_unit="psi")


# -------------------------------------------------------------------------------- real files


def raw_engineering(path: Path) -> tuple[list[float], list[float]]:
    """Engineering strain and stress (ksi) of a MatCal file, read independently."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    header = [name.strip().lstrip("#").strip() for name in rows[1]]
    e, s = header.index("engineering_strain"), header.index("engineering_stress")
    return [float(r[e]) for r in rows[2:]], [float(r[s]) for r in rows[2:]]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if not SMALL_TENSION.is_dir():
        pytest.skip(f"{SMALL_TENSION} is absent (the shared real data)")
    out = tmp_path_factory.mktemp("matcal") / "data.csv"
    assert main(["import", "matcal", str(SMALL_TENSION), "--out", str(out)]) == 0
    return read_experiments(out)


def test_real_files_64_specimens_with_labels(real):
    assert real.n_specimens == 64 and len(set(real.specimens)) == 64
    assert not any(sid.startswith("cleaned_") for sid in real.specimens)
    rates = real.labels["strain_rate"]
    assert {rate: rates.count(rate) for rate in set(rates)} == {
        1e-4: 15, 1e-2: 9, 500.0: 14, 1800.0: 14, 3600.0: 12}
    assert set(real.labels) == {"strain_rate"}
    assert real.temperature[real.mask].tolist() == pytest.approx([534.67 * 5 / 9] * sum(
        real.n_points), rel=1e-15)
    assert real.temperature[0, 0].item() == pytest.approx(297.04, abs=0.01)


def test_real_files_time_increases_and_stress_is_in_mpa(real):
    for j, n in enumerate(real.n_points):
        assert n >= 60
        assert bool((real.time[:n, j].diff() > 0).all())
        peak = real.stress[:n, j].max().item()
        assert 500.0 < peak < 2000.0, (real.specimens[j], peak)
        assert real.strain[0, j].item() < 1e-3          # starts at the pre-load minimum


def test_real_files_end_at_their_maximum_engineering_stress(real):
    for j, (sid, n) in enumerate(zip(real.specimens, real.n_points)):
        strain, stress = raw_engineering(SMALL_TENSION / f"cleaned_{sid}.csv")
        last = real.stress[n - 1, j].item() / math.exp(real.strain[n - 1, j].item())
        assert last == pytest.approx(max(stress) * KSI_TO_MPA, rel=1e-12), sid
        peak = stress.index(max(stress))
        lowest = min(strain[: peak + 1])
        start = max(i for i in range(peak + 1) if strain[i] == lowest)
        assert n == peak + 1 - start, sid
        assert math.expm1(real.strain[0, j].item()) == pytest.approx(lowest, rel=1e-12,
                                                                    abs=1e-18), sid


def test_real_astm_files_without_state_line(tmp_path):
    if not ASTM.is_dir():
        pytest.skip(f"{ASTM} is absent (the shared real data)")
    e = read_matcal(ASTM, pattern="*.dat")
    assert e.n_specimens == 8 and e.temperature is None and e.labels == {}
    assert all(n > 200 for n in e.n_points)
    assert 500.0 < e.stress[e.mask].max().item() < 2000.0
