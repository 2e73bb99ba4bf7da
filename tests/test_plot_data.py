"""`bayescal plot`: the figure of raw test data, its panels and colours, and its bad input."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from bayescal.cli import COMMANDS, main
from bayescal.data import read_experiments
from bayescal.errors import BadInput
from bayescal.plots import plot_data, save_figure

PNG = b"\x89PNG\r\n\x1a\n"
RATES = (1e-3, 1e-3, 1e-1, 1e-1, 10.0, 10.0)  # three rates, spanning four decades


def run(capsys, *argv):
    """``main(argv)``: exit status, stdout, stderr."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def write_data(path: Path, rates=RATES, points=20) -> Path:
    """Monotonic tension curves in the data format: elastic, then power-law hardening
    (stronger at higher rate), one specimen per rate given, labels strain_rate and heat."""
    rows = ["specimen,time,strain,stress,strain_rate,heat"]
    for j, rate in enumerate(rates):
        strain = np.linspace(0.0, 0.05 + 0.01 * j, points)
        stress = np.minimum(200e3 * strain, (250 + 10 * np.log10(rate) + 5 * j)
                            + 900 * strain ** 0.6)
        heat = "A" if j % 2 == 0 else "B"
        rows += [f"S{j + 1:02d},{float(e) / rate!r},{float(e)!r},{float(s)!r},{rate!r},{heat}"
                 for e, s in zip(strain, stress, strict=True)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "data.csv")


def panels(fig) -> list:
    """The data panels of a figure (not its colour bar)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def line_colours(ax) -> list[tuple]:
    return [matplotlib.colors.to_rgba(line.get_color()) for line in ax.get_lines()]


# ------------------------------------------------------------------------------ the figure


def test_plot_is_one_registered_command():
    assert "plot" in COMMANDS


def test_writes_a_png_figure(capsys, data, tmp_path):
    out = tmp_path / "figs" / "data.png"  # the folder is created
    status, stdout, err = run(capsys, "plot", data, "--out", out)
    assert (status, err) == (0, "")
    assert stdout == f"wrote {out} (6 specimens, 120 points)\n"
    content = out.read_bytes()
    assert content[:8] == PNG and len(content) > 20_000
    assert [p.name for p in out.parent.iterdir()] == ["data.png"]  # no temporary file left


def test_by_label_has_one_panel_per_value(capsys, data, tmp_path):
    experiments = read_experiments(data)
    fig = plot_data(experiments, by="strain_rate")
    try:
        axes = panels(fig)
        assert [ax.get_title() for ax in axes] == [
            "strain_rate = 0.001 (2 specimens)", "strain_rate = 0.1 (2 specimens)",
            "strain_rate = 10 (2 specimens)"]
        assert [len(ax.get_lines()) for ax in axes] == [2, 2, 2]
        assert all(ax.get_ylabel() in ("stress (MPa)", "") for ax in axes)
        assert axes[0].get_ylabel() == "stress (MPa)"
        assert "6 specimens" in fig._suptitle.get_text()
    finally:
        plt.close(fig)
    fig = plot_data(experiments, by="heat")  # a text label: panels A and B, coloured by rate
    try:
        assert [ax.get_title() for ax in panels(fig)] == ["heat = A (3 specimens)",
                                                          "heat = B (3 specimens)"]
        assert len(fig.axes) == 3  # and the colour bar
    finally:
        plt.close(fig)
    status, stdout, err = run(capsys, "plot", data, "--by", "strain_rate", "--out",
                              tmp_path / "by.png")
    assert (status, err) == (0, "")
    assert stdout.endswith("(6 specimens, 120 points, 3 panels by strain_rate)\n")


def test_colour_by_rate_log_scale_with_colour_bar(data):
    fig = plot_data(read_experiments(data))
    try:
        (ax,) = panels(fig)
        (bar,) = [a for a in fig.axes if a.get_label() == "<colorbar>"]
        assert bar.get_ylabel() == "strain_rate"
        assert [t.get_text() for t in bar.get_yticklabels()] == ["0.001", "0.1", "10"]
        colours = line_colours(ax)  # one colour per rate, the same for equal rates
        assert colours[0] == colours[1] and colours[2] == colours[3] and colours[4] == colours[5]
        assert len({colours[0], colours[2], colours[4]}) == 3
        # one block per rate, boundaries at geometric midpoints (log scale over four decades)
        assert np.allclose(bar.get_ylim(), (1e-4, 100.0))
        assert ax.get_xlabel() == "strain" and ax.get_ylabel() == "stress (MPa)"
        assert ax.get_legend() is not None  # 6 specimens: a legend of their ids
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            "S01", "S02", "S03", "S04", "S05", "S06"]
    finally:
        plt.close(fig)


def test_colour_scale_linear_within_a_decade_continuous_log_for_many_values(tmp_path):
    fig = plot_data(read_experiments(write_data(tmp_path / "near.csv", rates=(1.0, 2.0, 3.0))))
    try:
        bar = fig.axes[-1]
        assert np.allclose(bar.get_ylim(), (0.5, 3.5))  # linear: arithmetic midpoints
        assert bar.get_ylabel() == "strain_rate"
    finally:
        plt.close(fig)
    rates = tuple(10.0 ** k for k in range(-4, 9))  # 13 values: a continuous scale
    fig = plot_data(read_experiments(write_data(tmp_path / "wide.csv", rates=rates, points=4)))
    try:
        bar = fig.axes[-1]
        assert bar.get_yscale() == "log" and bar.get_ylabel() == "strain_rate (log scale)"
        assert np.allclose(bar.get_ylim(), (1e-4, 1e8))
    finally:
        plt.close(fig)


def test_time_axis_in_seconds_and_no_legend_for_many_specimens(tmp_path):
    experiments = read_experiments(write_data(tmp_path / "many.csv", rates=(1e-3, 2e-3) * 6))
    fig = plot_data(experiments, x="time")
    try:
        (ax,) = panels(fig)
        assert ax.get_xlabel() == "time since the specimen's first point (s)"
        assert ax.get_xscale() == "linear"  # durations differ by a factor 2
        assert ax.get_legend() is None  # 12 specimens: colours only
        assert fig._suptitle.get_text() == "many.csv: stress against time, 12 specimens"
        first = ax.get_lines()[0].get_xdata()
        assert first[0] == 0.0 and first[-1] == pytest.approx(0.05 / 1e-3)
    finally:
        plt.close(fig)


def test_time_axis_is_logarithmic_over_decades_of_duration(data):
    fig = plot_data(read_experiments(data), x="time")
    try:
        (ax,) = panels(fig)
        assert ax.get_xscale() == "log"
        assert ax.get_xlabel() == "time since the specimen's first point (s), log scale"
        assert all(len(line.get_xdata()) == 19 for line in ax.get_lines())  # t = 0 left out
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------ bad input


@pytest.fixture
def old_figure(tmp_path):
    path = tmp_path / "fig.png"
    path.write_bytes(b"an earlier figure")
    return path


def expect_error(capsys, old_figure, *argv, message):
    status, stdout, err = run(capsys, "plot", *argv)
    assert (status, stdout) == (2, "")
    assert err == f"bayescal: error: {message}\n"
    assert old_figure.read_bytes() == b"an earlier figure"
    assert sorted(p.name for p in old_figure.parent.iterdir() if p.name.startswith(".")) == []


def test_missing_file(capsys, tmp_path, old_figure):
    missing = tmp_path / "nothing.csv"
    expect_error(capsys, old_figure, missing, "--out", old_figure,
                 message=f"{missing}: file not found")


def test_unknown_label(capsys, data, old_figure):
    expect_error(capsys, old_figure, data, "--by", "grade", "--out", old_figure,
                 message=f"--by grade: {data} has no label 'grade' (labels: strain_rate, heat)")
    expect_error(capsys, old_figure, data, "--colour", "grade", "--out", old_figure,
                 message=f"--colour grade: {data} has no label 'grade' "
                         "(labels: strain_rate, heat)")


def test_non_numeric_colour_label(capsys, data, old_figure):
    expect_error(capsys, old_figure, data, "--colour", "heat", "--out", old_figure,
                 message=f"--colour heat: label 'heat' of {data} is not numeric (values: A, B); "
                         "colours need a numeric label")


def test_by_label_needs_2_to_12_values(capsys, tmp_path, old_figure):
    one = write_data(tmp_path / "one.csv", rates=(1e-3, 1e-3))
    expect_error(capsys, old_figure, one, "--by", "strain_rate", "--out", old_figure,
                 message=f"--by strain_rate: {one} has 1 distinct value(s) of 'strain_rate'; "
                         "one panel per value needs 2 to 12")
    many = write_data(tmp_path / "many.csv", rates=tuple(10.0 ** k for k in range(13)), points=4)
    expect_error(capsys, old_figure, many, "--by", "strain_rate", "--out", old_figure,
                 message=f"--by strain_rate: {many} has 13 distinct value(s) of 'strain_rate'; "
                         "one panel per value needs 2 to 12")


def test_out_folder_that_cannot_be_written(capsys, data, tmp_path, old_figure):
    inside_a_file = data / "fig.png"
    expect_error(capsys, old_figure, data, "--out", inside_a_file,
                 message=f"--out {inside_a_file}: '{data}' is a file, not a folder")
    deeper = data / "sub" / "fig.png"
    expect_error(capsys, old_figure, data, "--out", deeper,
                 message=f"--out {deeper}: '{data}' is a file, not a folder")
    expect_error(capsys, old_figure, data, "--out", tmp_path,
                 message=f"--out {tmp_path}: is a directory (give a file name for the figure)")
    text = tmp_path / "fig.txt"
    expect_error(capsys, old_figure, data, "--out", text,
                 message=f"--out {text}: unknown figure format '.txt' (use .png, .pdf or .svg)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to any folder")
def test_out_folder_without_write_permission(capsys, data, tmp_path, old_figure):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        expect_error(capsys, old_figure, data, "--out", locked / "fig.png",
                     message=f"--out {locked / 'fig.png'}: cannot write to folder "
                             f"'{locked}': Permission denied")
    finally:
        locked.chmod(0o700)


def test_out_folder_without_write_permission_as_root(capsys, data, tmp_path, old_figure,
                                                     monkeypatch):
    """The same message where the test runs as root: the permission answer is simulated."""
    monkeypatch.setattr("bayescal.output.os.access", lambda path, mode: False)
    expect_error(capsys, old_figure, data, "--out", old_figure,
                 message=f"--out {old_figure}: cannot write to folder '{tmp_path}': "
                         "Permission denied")


def test_interrupted_write_leaves_the_earlier_figure(data, old_figure, monkeypatch):
    fig = plot_data(read_experiments(data))

    def broken(self, fname, **kwargs):
        fname.write(b"half a figure")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_figure(fig, old_figure)
    finally:
        plt.close(fig)
    assert old_figure.read_bytes() == b"an earlier figure"
    assert [p.name for p in old_figure.parent.iterdir() if p.name.startswith(".")] == []


def test_library_errors_are_bad_input_naming_the_parameter(data):
    """The library names its parameter (``x``); the CLI names the flag (``--x``)."""
    with pytest.raises(BadInput, match="^x strain-rate: must be one of strain, time$"):
        plot_data(read_experiments(data), x="strain-rate")


def test_band_quantiles_leave_padded_points_nan_without_a_warning():
    """A shorter specimen's padded points (NaN in every draw) give NaN quantiles and no
    numpy warning on the user's screen; a failed draw (NaN at a point) is skipped."""
    import warnings

    import xarray as xr

    from bayescal.plots import band_quantiles

    draws = np.arange(40, dtype=float).reshape(1, 10, 2, 2)
    draws[..., 1, 1] = np.nan  # specimen 1's last point is padding
    draws[0, 0, 0, 0] = np.nan  # one draw failed there
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lo, mid, hi = band_quantiles(xr.DataArray(draws, dims=("chain", "draw", "specimen",
                                                                "step")))
    assert np.isnan(mid[1, 1]) and np.isfinite(mid[[0, 0, 1], [0, 1, 0]]).all()
    assert mid[0, 0] == np.median(draws[0, 1:, 0, 0])
