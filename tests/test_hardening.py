"""Hardening (issue 16): every bad input ends in exit 2 with one line, checkpoints run no code
and belong to one run, output folders are locked, outputs share one mode, help and Ctrl-C end
cleanly, and implausible units are pointed out. Tiny data (2 specimens, 7 points) keep each
test to seconds."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import arviz as az
import numpy as np
import pytest
import torch

import bayescal.cli as cli
from bayescal.card import load_card
from bayescal.cli import main
from bayescal.data import write_table
from bayescal.errors import BadInput
from bayescal.fit import fit_to_directory, noise_warnings
from bayescal.output import LOCK_NAME, FolderLock, file_mode

ROOT = Path(__file__).resolve().parents[1]
PERZYNA = ROOT / "models" / "perzyna-voce.toml"
CHABOCHE = ROOT / "models" / "chaboche.toml"


def run(capsys, argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny data, a MAP fit of it, and crafted inputs for the bad-input table, by name."""
    d = tmp_path_factory.mktemp("hardening")
    f = {"tmp": d, "card": PERZYNA, "chaboche": CHABOCHE, "host": socket.gethostname()}
    f["load"] = csv(d / "load.csv", "time,strain\n" + "".join(
        f"{t},{0.002 * t}\n" for t in range(7)))
    for name, seed in (("data", 0), ("other_data", 1)):
        assert main(["simulate", str(PERZYNA), "--load", str(f["load"]), "--specimens", "2",
                     "--seed", str(seed), "--noise", "2", "--out", str(d / f"{name}.csv")]) == 0
        f[name] = d / f"{name}.csv"
    f["fit"] = d / "fit"
    assert main(["fit", str(PERZYNA), "--data", str(f["data"]), "--method", "map", "--draws",
                 "5", "--no-figures", "--out", str(f["fit"])]) == 0
    f["posterior"] = f["fit"] / "posterior.nc"

    # cards: a narrowed bound (same model, other card), loose solver tolerances
    text = PERZYNA.read_text()
    f["narrow_card"] = csv(d / "narrow.toml", text.replace("[100.0, 600.0]", "[150.0, 500.0]"))
    f["atol_card"] = csv(d / "atol.toml", text.replace("atol = 1e-8", "atol = 1e8"))
    f["scheme_card"] = csv(d / "scheme.toml", text.replace("atol = 1e-8", "atol = 1e-8\nscheme = \"rk4\""))
    f["rtol_card"] = csv(d / "rtol.toml", text.replace("rtol = 1e-12", "rtol = 0.5"))

    # data: a stress of 1e308
    f["huge"] = csv(d / "huge.csv", "specimen,time,strain,stress\nA,0,0,0\nA,1,0.001,1e308\n")

    # posteriors: a NaN, a value out of bounds, a NEML2 card pointing elsewhere
    def crafted(name, change):
        idata = az.from_netcdf(f["posterior"])
        idata.posterior = idata.posterior.load()
        change(idata.posterior)
        idata.to_netcdf(d / name)
        return d / name

    f["nan_post"] = crafted("nan.nc", lambda p: p["sy"].values.__setitem__((0, 0, 0), np.nan))
    f["out_post"] = crafted("out.nc", lambda p: p["eta"].values.__setitem__((0, 0, 1), 1e6))
    f["neml2_post"] = crafted("neml2.nc", lambda p: p.attrs.update(
        card="/nonexistent/card.toml",
        card_toml='[model]\nbackend = "neml2"\nfile = "../etc/passwd"\n'))
    f["neml2_other_post"] = crafted("neml2-other.nc", lambda p: p.attrs.update(
        card="/etc/card.toml", card_file_sha256="0" * 64,
        card_toml='[model]\nbackend = "neml2"\nfile = "passwd"\n'))

    # checkpoints: truncated, garbage
    saved = (f["fit"] / "checkpoint.pt").read_bytes()
    for name, content in (("truncated", saved[: len(saved) // 2]), ("garbage", b"garbage\n")):
        (d / name).mkdir()
        (d / name / "checkpoint.pt").write_bytes(content)
        f[name] = d / name

    # an output folder held by a live process (pid 1) of this host
    (d / "locked").mkdir()
    (d / "locked" / LOCK_NAME).write_text(f"pid 1\nhost {f['host']}\n")
    f["locked"] = d / "locked"

    # a test file whose state line holds a 400-digit integer
    (d / "matcal").mkdir()
    csv(d / "matcal" / "a.csv", "{'heat': " + "9" * 400 + "}\n"
        "time,engineering_strain,engineering_stress\n0,0,0\n1,0.01,50\n2,0.02,60\n")
    f["matcal"] = d / "matcal"
    return f


FIT = "fit {card} --data {data} --method map --draws 5 --no-figures"
PREDICT = "predict {posterior} --load {load} --draws 5 --no-figures"
NOT_A_CHECKPOINT = "checkpoint.pt: not a usable bayescal checkpoint ("

#: One row per bad input: id, command line (formatted with the ``files`` fixture), exit
#: status, and the one stderr line after "bayescal: error: " (a prefix when it ends in "...").
BAD_INPUT = [
    ("fit-seed-negative", FIT + " --seed -1 --out {tmp}/o", 2,
     "--seed must be an integer from 0 to 4294967295, got -1"),
    ("fit-seed-64-bits", FIT + " --seed 18446744073709551616 --out {tmp}/o", 2,
     "--seed must be an integer from 0 to 4294967295, got 18446744073709551616"),
    ("fit-lr-inf", FIT + " --lr inf --out {tmp}/o", 2,
     "--lr must be a positive finite number, got inf"),
    ("fit-out-under-a-file", FIT + " --out {data}/sub", 2,
     "--out {data}/sub: '{data}' is a file, not a folder"),
    ("fit-out-unwritable", FIT + " --out /proc/bayescal-test/o", 2,
     "--out /proc/bayescal-test/o: cannot create the folder: ..."),
    ("fit-out-locked", FIT + " --out {locked}", 2,
     "--out {locked}: in use by another bayescal run (pid 1 on host {host}); wait for it to "
     "end, or remove {locked}/" + LOCK_NAME + " if that run is gone"),
    ("fit-data-dev-zero", "fit {card} --data /dev/zero --out {tmp}/o", 2,
     "/dev/zero: not a regular file"),
    ("fit-data-stress-1e308", "fit {card} --data {huge} --out {tmp}/o", 2,
     "{huge} line 3 (specimen 'A'): stress '1e308' is beyond 100000 MPa (stress must be in MPa; "
     "Pa or psi?)"),
    ("resume-truncated", FIT + " --resume --out {truncated}", 2,
     "{truncated}/" + NOT_A_CHECKPOINT + "..."),
    ("resume-garbage", FIT + " --resume --out {garbage}", 2,
     "{garbage}/" + NOT_A_CHECKPOINT + "..."),
    ("resume-other-seed", FIT + " --seed 1 --resume --out {fit}", 2,
     "--resume: {fit}/checkpoint.pt belongs to another run (--seed 0 there, 1 now): rerun with "
     "that run's inputs, or without --resume to start afresh"),
    ("resume-other-data", "fit {card} --data {other_data} --method map --resume --out {fit}", 2,
     "--resume: {fit}/checkpoint.pt belongs to another run (the data differs): ..."),
    ("resume-narrowed-bounds", "fit {narrow_card} --data {data} --method map --resume "
     "--out {fit}", 2,
     "--resume: {fit}/checkpoint.pt belongs to another run (the model card differs): ..."),
    ("resume-other-method", "fit {card} --data {data} --method laplace --resume --out {fit}", 2,
     "--resume: {fit}/checkpoint.pt belongs to another run (--guide delta there, mvn now; "
     "--method map there, laplace now): ..."),
    ("card-dev-zero", "check /dev/zero", 2, "/dev/zero: not a regular file"),
    ("card-scheme-unknown", "check {scheme_card}", 2,
     "{scheme_card}: [solver] scheme 'rk4' must be one of 'backward-euler', 'sdirk2', "
     "'radau-iia', 'radau-iia5'"),
    ("card-atol-loose", "check {atol_card}", 2,
     "{atol_card}: [solver] atol must be at most 0.01, got 100000000.0 (a looser tolerance "
     "accepts unconverged solutions)"),
    ("card-rtol-loose", "check {rtol_card}", 2,
     "{rtol_card}: [solver] rtol must be at most 0.001, got 0.5 ..."),
    ("simulate-noise-inf", "simulate {card} --load {load} --noise inf --out {tmp}/s.csv", 2,
     "the noise sd (--noise) must be a non-negative finite number, got inf"),
    ("simulate-seed-negative", "simulate {card} --load {load} --seed -3 --out {tmp}/s.csv", 2,
     "--seed must be an integer from 0 to 4294967295, got -3"),
    ("predict-other-model", PREDICT + " --card {chaboche} --out {tmp}/p", 2,
     "--card {chaboche}: the card {chaboche} (chaboche) does not match the posterior: the "
     "card's C, C_pop_loc, C_pop_mean, C_pop_scale, C_pop_sd, g, g_pop_loc, g_pop_mean, "
     "g_pop_scale, g_pop_sd not in the posterior"),
    ("predict-nan", "predict {nan_post} --load {load} --out {tmp}/p", 2,
     "{nan_post}: posterior variable sy has a value nan that is not a finite number inside the "
     "bounds [100, 600]"),
    ("predict-out-of-bounds", "predict {out_post} --load {load} --out {tmp}/p", 2,
     "{out_post}: posterior variable eta has a value 1000000.0 that is not a finite number "
     "inside the bounds [10, 2000]"),
    ("predict-neml2-card-elsewhere", "predict {neml2_post} --load {load} --out {tmp}/p", 2,
     "the NEML2 input file of the posterior's card /nonexistent/card.toml is missing or has "
     "changed since the fit: give the card with --card"),
    ("predict-neml2-input-other-file", "predict {neml2_other_post} --load {load} --out {tmp}/p",
     2, "the NEML2 input file of the posterior's card /etc/card.toml is missing or has "
     "changed since the fit: give the card with --card"),
    ("predict-seed-negative", PREDICT + " --seed -1 --out {tmp}/p", 2,
     "--seed must be an integer from 0 to 4294967295, got -1"),
    ("import-400-digit-state", "import matcal {matcal} --out {tmp}/m.csv", 2,
     "{matcal}/a.csv line 1: state value heat=999999999999... (400 digits) is too large a "
     "number"),
]


@pytest.mark.parametrize("argv, status, message", [row[1:] for row in BAD_INPUT],
                         ids=[row[0] for row in BAD_INPUT])
def test_bad_input_is_one_line_and_its_exit_status(capsys, files, argv, status, message):
    code, _, err = run(capsys, shlex.split(argv.format(**files)))
    expected = message.format(**files)
    assert code == status, err
    assert err.count("\n") == 1 and err.startswith("bayescal: error: "), err
    line = err[len("bayescal: error: "):-1]
    if expected.endswith("..."):
        assert line.startswith(expected[:-3]), line
    else:
        assert line == expected


def test_the_fit_left_no_lock_and_outputs_follow_the_umask(files):
    assert not (files["fit"] / LOCK_NAME).exists()
    for name in ("posterior.nc", "checkpoint.pt"):
        assert (files["fit"] / name).stat().st_mode & 0o777 == file_mode(), name
    old = os.umask(0o077)
    try:
        table = files["tmp"] / "private.csv"
        write_table(table, ["a"], [[1]])
        assert table.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_crafted_checkpoint_runs_no_code(capsys, files, tmp_path):
    marker = tmp_path / "marker"

    class Crafted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    out = tmp_path / "fit"
    out.mkdir()
    torch.save({"state": Crafted()}, out / "checkpoint.pt")
    code, _, err = run(capsys, ["fit", PERZYNA, "--data", files["data"], "--method", "map",
                                "--resume", "--out", out])
    assert code == 2 and err.startswith(f"bayescal: error: {out}/{NOT_A_CHECKPOINT}")
    assert not marker.exists()
    torch.load(out / "checkpoint.pt", weights_only=False)  # the file does carry code:
    assert marker.exists()


def test_a_killed_map_stage_resumes_where_it_was(files, tmp_path, monkeypatch):
    """The MAP stage is checkpointed every Newton iteration: killed in its third, the resumed
    run continues from the second and ends where an uninterrupted run ends (to 1e-6: its
    first solves start from the predictor, not the last trajectory, so they agree to the
    solver's tolerance, and Newton's stopping rule lets that through: 1.2e-8 relative in
    sy)."""
    import bayescal.inference.laplace as laplace

    spec, out = load_card(PERZYNA), tmp_path / "fit"
    from bayescal.data import read_experiments

    experiments = read_experiments(files["data"])
    original, calls = laplace.gradient_and_hessian, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(laplace, "gradient_and_hessian", dying)
    with pytest.raises(KeyboardInterrupt):
        fit_to_directory(spec, experiments, out, figures=False, method="map", draws=5,
                         progress=False)
    monkeypatch.setattr(laplace, "gradient_and_hessian", original)
    assert not (out / LOCK_NAME).exists()
    from bayescal.inference.checkpoints import _read_checkpoint

    assert _read_checkpoint(out / "checkpoint.pt")["state"]["stage"] == "map"
    resumed = fit_to_directory(spec, experiments, out, figures=False, method="map", draws=5,
                               progress=False, resume=True)
    assert resumed.posterior.attrs["resumed_from"] == 2
    whole = az.from_netcdf(files["posterior"])
    for name in ("sy", "eta_pop_mean", "noise_sd"):
        np.testing.assert_allclose(resumed.posterior[name].values, whole.posterior[name].values,
                                   rtol=1e-6)


def test_a_new_run_says_it_replaces_another_runs_checkpoint(capsys, files, tmp_path):
    out = tmp_path / "fit"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((files["fit"] / "checkpoint.pt").read_bytes())
    code, _, err = run(capsys, shlex.split(FIT.format(**files)) + ["--seed", "1", "--out", out])
    assert code == 0, err
    assert (f"bayescal: warning: {out}/checkpoint.pt holds the checkpoint of an earlier run "
            "(guide stage, iteration ") in err
    assert "this run replaces it (to continue that run instead, rerun it with --resume)" in err


def test_folder_lock_names_its_holder_and_takes_over_a_dead_one(tmp_path):
    with FolderLock(tmp_path):
        text = (tmp_path / LOCK_NAME).read_text()
        assert text == f"pid {os.getpid()}\nhost {socket.gethostname()}\n"
        with pytest.raises(BadInput, match=f"in use by another bayescal run \\(pid {os.getpid()}"):
            FolderLock(tmp_path).__enter__()
    assert not (tmp_path / LOCK_NAME).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(f"pid {dead.pid}\nhost {socket.gethostname()}\n")
    with FolderLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()}\n")
    (tmp_path / LOCK_NAME).write_text(f"pid {dead.pid}\nhost another-host\n")
    with pytest.raises(BadInput, match=f"pid {dead.pid} on host another-host"):
        FolderLock(tmp_path).__enter__()


def test_help_of_every_command_exits_0(capsys):
    status, out, err = run(capsys, ["--help"])
    assert status == 0 and err == "" and "posterior means, sd and 90% intervals" in out
    for name in cli.COMMANDS:
        status, out, err = run(capsys, [name, "--help"])
        assert status == 0 and err == "" and out.startswith(f"usage: bayescal {name}"), name


@pytest.mark.parametrize("argv", [["--help"], ["models"]])
def test_help_and_models_import_no_torch(argv):
    """They answer at once: nothing heavy is imported (torch alone takes seconds)."""
    code = (f"import sys; from bayescal.cli import main; status = main({argv!r}); "
            "heavy = [m for m in ('torch', 'pyro', 'arviz', 'matplotlib', 'pyzag') "
            "if m in sys.modules]; print(heavy); sys.exit(10 if heavy else status)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("[]")


def test_models_lists_the_catalogue_that_the_classes_use():
    """``bayescal models`` reads the torch-free catalogue; the model classes take their
    names, parameters and state from the same entries."""
    from bayescal.catalogue import CATALOGUE
    from bayescal.material import MODELS

    assert list(CATALOGUE) == list(MODELS)
    for name, cls in MODELS.items():
        entry = CATALOGUE[name]
        assert (cls.name, cls.parameters, cls.state_names, cls.summary) == \
            (entry.name, entry.parameters, entry.state_names, entry.summary)


def test_an_interrupt_at_any_moment_is_exit_130_and_one_line(capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "models", (cli._add_models, interrupted))
    assert run(capsys, ["models"])[::2] == (130, "bayescal: error: interrupted\n")
    monkeypatch.setattr(cli, "_fit_options", interrupted)  # while parsing (importing)
    assert run(capsys, ["fit", "--help"])[::2] == (130, "bayescal: error: interrupted\n")


def test_implausible_units_are_pointed_out(capsys, files, tmp_path):
    """Strain in percent and stress in psi: warned before the fit, kept in the attributes."""
    from bayescal.data import read_experiments

    data = read_experiments(files["data"])
    scaled = tmp_path / "percent-psi.csv"
    write_table(scaled, ["specimen", "time", "strain", "stress"],
                [[sid, t, 100 * e, 145.04 * s] for sid, t, e, s in zip(
                    *(data.to_frame()[c] for c in ("specimen", "time", "strain", "stress")))])
    out = tmp_path / "fit"
    code, _, err = run(capsys, ["fit", PERZYNA, "--data", scaled, "--method", "map", "--draws",
                                2, "--no-figures", "--out", out])
    assert code == 0, err
    strain = f"{scaled}: the largest |strain| is 1.2, above 1: is strain given in percent?"
    stress = f"{scaled}: the largest |stress| is "
    warnings = [line for line in err.splitlines() if line.startswith("bayescal: warning: ")]
    assert any(strain in line for line in warnings), err
    assert any(stress in line and "above 20,000 MPa: is stress given in another unit (psi)?"
               in line for line in warnings), err
    stored = az.from_netcdf(out / "posterior.nc").posterior.attrs["warnings"]
    assert strain in stored and stress in stored


def test_noise_far_above_its_prior_is_pointed_out():
    spec = load_card(PERZYNA)  # noise prior scale 10 MPa
    assert noise_warnings(spec, torch.tensor([25.0, 29.0])) == []
    (line,) = noise_warnings(spec, torch.tensor([40.0, 44.0]))
    assert line.startswith("the fitted noise sd is 42 MPa, more than 3 times the card's "
                           "[noise] prior_scale of 10 MPa")


def test_a_good_posterior_still_predicts(capsys, files, tmp_path):
    out = tmp_path / "p"
    code, _, err = run(capsys, shlex.split(PREDICT.format(**files)) + ["--out", out])
    assert code == 0, err
    assert not (out / LOCK_NAME).exists()
    assert (out / "predictions.nc").stat().st_mode & 0o777 == file_mode()


def test_a_neml2_input_file_must_sit_under_its_cards_folder(tmp_path):
    from bayescal.neml2_backend import input_file

    (tmp_path / "cards" / "inputs").mkdir(parents=True)
    card = tmp_path / "cards" / "card.toml"
    (tmp_path / "cards" / "inputs" / "model.i").write_text("")
    (tmp_path / "outside.i").write_text("")
    (tmp_path / "cards" / "link.i").symlink_to(tmp_path / "outside.i")
    assert input_file(card, "inputs/model.i", "c: [model]") == card.parent / "inputs" / "model.i"
    for name in ("../outside.i", str(tmp_path / "outside.i"), "link.i", "/etc/passwd"):
        with pytest.raises(BadInput, match=f"c: \\[model\\] file '{name}' is outside the card's "
                                            "folder"):
            input_file(card, name, "c: [model]")
    with pytest.raises(BadInput, match="c: \\[model\\] file 'inputs' is not a regular file"):
        input_file(card, "inputs", "c: [model]")
    with pytest.raises(BadInput, match="c: \\[model\\] file 'none.i' not found"):
        input_file(card, "none.i", "c: [model]")


def test_a_failed_run_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError):
        with FolderLock(out):
            assert (out / LOCK_NAME).is_file()
            raise RuntimeError("failed")
    assert not (tmp_path / "new").exists()
    with FolderLock(out):
        (out / "result.csv").write_text("")
    assert sorted(p.name for p in out.iterdir()) == ["result.csv"]
