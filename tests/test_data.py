"""The data layer: reading, validation messages, padding, load paths, round trips."""

import math
import os

import pytest
import torch

from bayescal.data import Experiments, read_experiments, read_load_path, write_experiments
from bayescal.errors import BadInput

HEADER = "specimen,time,strain,stress,strain_rate,heat\n"
GOOD = HEADER + (
    "S2,0.0,0.0,0.0,1e-3,A\n"
    "S2,1.0,0.001,200.0,0.001,A\n"
    "S2,2.0,0.002,250.0,1e-3,A\n"
    "S1,0.0,0.0,0.0,0.01,B\n"
    "S1,0.1,0.001,210.0,0.01,B\n"
)


def write(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def bad(tmp_path, text, reader=read_experiments):
    """The message that reading ``text`` raises, with the file path shortened to data.csv."""
    path = write(tmp_path, text)
    with pytest.raises(BadInput) as info:
        reader(path)
    message = str(info.value)
    assert "\n" not in message
    return message.replace(str(path), "data.csv")


def test_reads_specimens_in_order_of_appearance_with_padding_and_mask(tmp_path):
    e = read_experiments(write(tmp_path, GOOD))
    assert e.specimens == ("S2", "S1")
    assert (e.n_specimens, e.n_steps, e.n_points) == (2, 3, (3, 2))
    assert e.time.dtype == e.strain.dtype == e.stress.dtype == torch.float64
    assert e.time.shape == e.strain.shape == e.stress.shape == e.mask.shape == (3, 2)
    assert e.mask.tolist() == [[True, True], [True, True], [True, False]]
    assert e.time[:, 1].tolist() == [0.0, 0.1, 0.1]
    assert e.strain[:, 1].tolist() == [0.0, 0.001, 0.001]
    assert e.stress[:, 0].tolist() == [0.0, 200.0, 250.0]
    assert e.stress[:2, 1].tolist() == [0.0, 210.0] and math.isnan(e.stress[2, 1])
    # padded steps have zero time and strain increments
    assert e.time.diff(dim=0)[1, 1] == 0.0 and e.strain.diff(dim=0)[1, 1] == 0.0
    assert e.temperature is None
    assert e.source == str(tmp_path / "data.csv")


def test_labels_are_one_value_per_specimen(tmp_path):
    e = read_experiments(write(tmp_path, GOOD))
    assert e.labels == {"strain_rate": (1e-3, 1e-2), "heat": ("A", "B")}


def test_a_label_column_with_any_text_stays_text(tmp_path):
    text = "specimen,time,strain,stress,heat\nS1,0,0,0,001\nS1,1,1,1,001\nS2,0,0,0,X7\nS2,1,1,1,X7\n"
    assert read_experiments(write(tmp_path, text)).labels == {"heat": ("001", "X7")}


def test_temperature_is_padded_by_repetition(tmp_path):
    text = ("specimen,time,strain,stress,temperature\n"
            "A,0,0,0,293\nA,1,0.01,100,300\nB,0,0,0,600\nB,1,0.01,90,610\nB,2,0.02,95,620\n")
    e = read_experiments(write(tmp_path, text))
    assert e.temperature.dtype == torch.float64
    assert e.temperature.tolist() == [[293.0, 600.0], [300.0, 610.0], [300.0, 620.0]]
    assert e.labels == {}


def test_blank_lines_and_whitespace_are_tolerated(tmp_path):
    text = "specimen, time ,strain,stress\n\nS1, 0,0,0\nS1,1 ,1,1\n\n"
    e = read_experiments(write(tmp_path, text))
    assert e.specimens == ("S1",) and e.time[:, 0].tolist() == [0.0, 1.0]


def test_select_reorders_and_trims_padding(tmp_path):
    e = read_experiments(write(tmp_path, GOOD))
    s = e.select(["S1"])
    assert s.specimens == ("S1",) and s.n_steps == 2 and s.n_points == (2,)
    assert s.stress[:, 0].tolist() == [0.0, 210.0]
    assert s.labels == {"strain_rate": (0.01,), "heat": ("B",)}
    both = e.select(["S1", "S2"])
    assert both.specimens == ("S1", "S2") and both.n_steps == 3
    assert both.time[:, 1].tolist() == e.time[:, 0].tolist()
    with pytest.raises(BadInput, match=r"no specimen 'S9' \(specimens: S2, S1\)"):
        e.select(["S1", "S9"])


def assert_same(a: Experiments, b: Experiments):
    assert a.specimens == b.specimens and a.labels == b.labels
    assert torch.equal(a.mask, b.mask)
    for name in ("time", "strain", "stress", "temperature"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.allclose(x, y, rtol=0, atol=0, equal_nan=True), name


def test_round_trip_write_read_is_exact(tmp_path):
    text = ("specimen,time,strain,stress,temperature,strain_rate,heat\n"
            "S2,0.0,0.0,0.0,293.15,1e-3,A\nS2,0.1,0.1234567890123,201.000000001,294,1e-3,A\n"
            "S2,0.3,0.2,1e-7,295,1e-3,A\nS1,0,0,0,300,2.5,B\nS1,1,1,1,301,2.5,B\n")
    e = read_experiments(write(tmp_path, text))
    out = tmp_path / "out.csv"
    write_experiments(e, out)
    assert_same(read_experiments(out), e)
    e.write_csv(out)
    assert_same(read_experiments(out), e)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert out.read_text().splitlines()[0] == "specimen,time,strain,stress,temperature,strain_rate,heat"
    assert len(out.read_text().splitlines()) == 6  # padded rows are not written


def test_write_replaces_an_existing_file_and_respects_umask(tmp_path):
    e = read_experiments(write(tmp_path, GOOD))
    out = write(tmp_path, "old contents\n", "out.csv")
    write_experiments(e, out)
    assert read_experiments(out).specimens == ("S2", "S1")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_to_frame_has_one_row_per_recorded_point(tmp_path):
    pytest.importorskip("pandas")
    frame = read_experiments(write(tmp_path, GOOD)).to_frame()
    assert list(frame.columns) == ["specimen", "time", "strain", "stress", "strain_rate", "heat"]
    assert frame["specimen"].tolist() == ["S2", "S2", "S2", "S1", "S1"]
    assert frame["stress"].tolist() == [0.0, 200.0, 250.0, 0.0, 210.0]
    assert frame["heat"].tolist() == ["A", "A", "A", "B", "B"]


# ----------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(BadInput, match=r"nothere\.csv: file not found$"):
        read_experiments(tmp_path / "nothere.csv")


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_file(tmp_path, text):
    assert bad(tmp_path, text) == "data.csv: file is empty"


def test_header_only(tmp_path):
    assert bad(tmp_path, HEADER) == "data.csv: has a header but no data rows"


@pytest.mark.parametrize("column", ["specimen", "time", "strain", "stress"])
def test_missing_required_column(tmp_path, column):
    names = [c for c in ["specimen", "time", "strain", "stress"] if c != column]
    text = ",".join(names) + "\n" + ",".join(["1"] * len(names)) + "\n"
    assert bad(tmp_path, text) == (
        f"data.csv: missing required column {column!r} (columns: {', '.join(names)})")


def test_duplicate_and_unnamed_columns(tmp_path):
    assert bad(tmp_path, "specimen,time,strain,stress,time\nS,0,0,0,0\n") == (
        "data.csv line 1: duplicate column 'time'")
    assert bad(tmp_path, "specimen,time,strain,stress,\nS,0,0,0,\n") == (
        "data.csv line 1: column 5 has no name")


def test_wrong_number_of_fields(tmp_path):
    assert bad(tmp_path, "specimen,time,strain,stress\nS1,0,0,0\nS1,1,1\n") == (
        "data.csv line 3: expected 4 fields, found 3")


@pytest.mark.parametrize("column, value", [
    ("time", "abc"), ("strain", "nan"), ("stress", "inf"), ("stress", "-inf"), ("strain", ""),
    ("temperature", "NaN"), ("temperature", "hot"),
])
def test_non_numeric_or_non_finite_value(tmp_path, column, value):
    row = {"specimen": "S2", "time": "1", "strain": "0.1", "stress": "5", "temperature": "300"}
    row[column] = value
    text = ("specimen,time,strain,stress,temperature\n"
            "S1,0,0,0,300\nS1,1,0.1,5,300\nS2,0,0,0,300\n" + ",".join(row.values()) + "\n")
    assert bad(tmp_path, text) == (
        f"data.csv line 5 (specimen 'S2'): {column} {value!r} is not a finite number")


@pytest.mark.parametrize("previous, time", [("0.5", "0.5"), ("0.5", "0.25")])
def test_time_not_strictly_increasing(tmp_path, previous, time):
    text = (HEADER + "S1,0,0,0,1,A\nS1,1,0,0,1,A\n"
            f"S2,0,0,0,1,A\nS2,{previous},0,0,1,A\nS2,{time},0,0,1,A\n")
    assert bad(tmp_path, text) == (
        f"data.csv line 6 (specimen 'S2'): time {float(time)!r} is not greater "
        f"than the previous {float(previous)!r}")


def test_label_changing_within_a_specimen(tmp_path):
    text = HEADER + "S1,0,0,0,0.001,A\nS1,1,0,0,1e-3,A\nS1,2,0,0,0.01,A\n"
    assert bad(tmp_path, text) == (
        "data.csv line 4 (specimen 'S1'): label 'strain_rate' changes from '0.001' to '0.01' "
        "within the specimen")
    text = HEADER + "S1,0,0,0,1,A\nS1,1,0,0,1,A\nS2,0,0,0,1,B\nS2,1,0,0,1,C\n"
    assert bad(tmp_path, text) == (
        "data.csv line 5 (specimen 'S2'): label 'heat' changes from 'B' to 'C' within the specimen")


@pytest.mark.parametrize("text, line, specimen", [
    ("specimen,time,strain,stress\nS1,0,0,0\nS2,0,0,0\nS2,1,1,1\n", 2, "S1"),
    ("specimen,time,strain,stress\nS1,0,0,0\nS1,1,1,1\nS2,0,0,0\n", 4, "S2"),
])
def test_specimen_with_a_single_point(tmp_path, text, line, specimen):
    assert bad(tmp_path, text) == (
        f"data.csv line {line} (specimen {specimen!r}): needs at least 2 points, has 1")


def test_specimen_rows_must_be_contiguous(tmp_path):
    text = "specimen,time,strain,stress\nS1,0,0,0\nS1,1,1,1\nS2,0,0,0\nS2,1,1,1\nS1,2,2,2\n"
    assert bad(tmp_path, text) == (
        "data.csv line 6 (specimen 'S1'): specimen appears again after other specimens "
        "(its rows must be contiguous)")


def test_empty_specimen_id(tmp_path):
    assert bad(tmp_path, "specimen,time,strain,stress\nS1,0,0,0\n,1,1,1\n") == (
        "data.csv line 3: specimen id is empty")


def test_undecodable_file(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"specimen,time,strain,stress\n\xff\xfe,0,0,0\n")
    with pytest.raises(BadInput, match=r"data\.csv: cannot read: 'utf-8' codec"):
        read_experiments(path)


# ----------------------------------------------------------------------------- load paths

PATH = "time,strain,stress\n0,0,1\n1,0.01,n/a\n2,0.0,3\n"  # stress is ignored


def test_load_path_without_specimen_column_is_one_path(tmp_path):
    e = read_load_path(write(tmp_path, PATH))
    assert e.specimens == ("path",) and e.stress is None
    assert e.strain[:, 0].tolist() == [0.0, 0.01, 0.0]
    assert e.mask.all()


def test_load_path_is_replicated_under_given_ids(tmp_path):
    e = read_load_path(write(tmp_path, PATH), specimens=["a", "b", "c"])
    assert e.specimens == ("a", "b", "c")
    assert e.time.shape == (3, 3) and e.stress is None
    assert (e.time == torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)[:, None]).all()
    assert (e.strain == e.strain[:, :1]).all()


def test_load_path_with_specimen_column(tmp_path):
    text = "specimen,time,strain,strain_rate\nB,0,0,1\nB,1,1,1\nB,2,2,1\nA,0,0,2\nA,1,2,2\n"
    e = read_load_path(write(tmp_path, text))
    assert e.specimens == ("B", "A") and e.n_points == (3, 2) and e.stress is None
    assert e.labels == {"strain_rate": (1.0, 2.0)}
    picked = read_load_path(write(tmp_path, text), specimens=["A"])
    assert picked.specimens == ("A",) and picked.n_steps == 2
    with pytest.raises(BadInput, match=r"no specimen 'C'"):
        read_load_path(write(tmp_path, text), specimens=["A", "C"])


def test_load_path_round_trip_has_no_stress_column(tmp_path):
    e = read_load_path(write(tmp_path, PATH), specimens=["a", "b"])
    out = tmp_path / "out.csv"
    write_experiments(e, out)
    assert out.read_text().splitlines()[0] == "specimen,time,strain"
    assert_same(read_load_path(out), e)


def test_load_path_errors_use_the_same_validation(tmp_path):
    assert bad(tmp_path, "time,strain\n0,0\n0,1\n", read_load_path) == (
        "data.csv line 3: time 0.0 is not greater than the previous 0.0")
    assert bad(tmp_path, "time,strain\n0,0\n", read_load_path) == (
        "data.csv line 2: needs at least 2 points, has 1")
    assert bad(tmp_path, "time,stress\n0,0\n1,1\n", read_load_path) == (
        "data.csv: missing required column 'strain' (columns: time, stress)")
    assert bad(tmp_path, "specimen,time,strain\nA,0,0\nA,1,x\n", read_load_path) == (
        "data.csv line 3 (specimen 'A'): strain 'x' is not a finite number")
