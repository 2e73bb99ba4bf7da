"""The command line: `models`, `check` and `simulate`, their outputs and their exit statuses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import arviz as az
import pytest
import torch

from bayescal import check
from bayescal.card import load_card
from bayescal.check import informative_path
from bayescal.cli import COMMANDS, main
from bayescal.data import read_experiments
from bayescal.hierarchy import draw_specimens
from bayescal.material import PerzynaVoce

ROOT = Path(__file__).resolve().parents[1]
CARDS = sorted((ROOT / "models").glob("*.toml"))
PERZYNA = str(ROOT / "models" / "perzyna-voce.toml")
LOAD = str(ROOT / "docs" / "examples" / "informative-load.csv")


def run(capsys, *argv):
    """``main(argv)``: exit status, stdout, stderr."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def write_csv(path: Path, header: list[str], rows) -> Path:
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


@pytest.fixture
def short_load(tmp_path):
    """The informative path with 10 points a segment, no specimen column."""
    time, strain = informative_path(10)
    return write_csv(tmp_path / "short.csv", ["time", "strain"],
                     zip(map(repr, time.tolist()), map(repr, strain.tolist()), strict=True))


# ------------------------------------------------------------------------------------ models


def test_commands_are_registered_in_one_table():
    assert {"models", "check", "simulate"} <= set(COMMANDS)


def test_models_lists_the_built_in_models(capsys):
    status, out, err = run(capsys, "models")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["model", "parameters", "state", "summary"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"perzyna-voce", "chaboche", "voce-jc", "voce-jc-thermal"}
    assert "E, sy, Rinf, d, eta, n" in rows["perzyna-voce"] and "stress, R" in rows["perzyna-voce"]
    assert "E, sy, Rinf, d, C, g, eta, n" in rows["chaboche"] and "stress, R, X" in rows["chaboche"]
    assert "E, sy, Rinf, d, C, eps0" in rows["voce-jc"]
    assert ("E, sy, Rinf, d, C, eps0, Tref, Tmelt, m, beta, rho_c, rate_ad, T0"
            in rows["voce-jc-thermal"] and "stress, R, heating" in rows["voce-jc-thermal"])


def test_python_dash_m_bayescal_runs():
    proc = subprocess.run([sys.executable, "-m", "bayescal", "models"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "perzyna-voce" in proc.stdout and "voce-jc" in proc.stdout


# ------------------------------------------------------------------------------------- check

ROW = re.compile(r"^(jacobian|adjoint-gradient|chunking|integration|response)"
                 r"\s+(\S+)\s+(\S+)\s+(PASS|FAIL)\s+(.*)$")


def parse_check(out: str) -> dict[str, tuple[float, float, str, str]]:
    rows = {}
    for line in out.splitlines():
        match = ROW.match(line)
        if match:
            name, value, tol, verdict, detail = match.groups()
            rows[name] = (float(value), float(tol), verdict, detail)
    return rows


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.stem)
def test_check_passes_for_every_shipped_card(capsys, card):
    status, out, err = run(capsys, "check", card)
    assert status == 0, out + err
    rows = parse_check(out)
    assert list(rows) == ["jacobian", "adjoint-gradient", "chunking", "integration", "response"]
    for name, (value, tol, verdict, detail) in rows.items():
        assert tol == check.TOLERANCES[name]
        assert value <= tol and verdict == "PASS", (name, value, detail)
    assert rows["jacobian"][0] <= 1e-12
    assert rows["adjoint-gradient"][0] <= 1e-7
    numbers = re.search(r"rms (\S+) MPa, max (\S+) MPa", rows["integration"][3])
    rms, worst = map(float, numbers.groups())
    assert rms == pytest.approx(rows["integration"][0], rel=1e-2) and rms <= worst
    assert "all 5 checks passed" in out


def test_check_with_a_broken_jacobian_exits_1(capsys, monkeypatch, short_load):
    rate = PerzynaVoce.rate
    monkeypatch.setattr(PerzynaVoce, "rate",
                        lambda self, state, p: (lambda r, j: (r, 1.01 * j))(*rate(self, state, p)))
    status, out, err = run(capsys, "check", PERZYNA, "--load", short_load)
    assert status == 1
    rows = parse_check(out)
    assert rows["jacobian"][2] == "FAIL" and rows["jacobian"][0] > 1e-3
    assert rows["adjoint-gradient"][2] == "FAIL"
    assert rows["chunking"][2] == "PASS"
    assert "FAILED: jacobian, adjoint-gradient" in out


def test_check_fails_when_a_tolerance_is_not_met(capsys, monkeypatch, short_load):
    monkeypatch.setitem(check.TOLERANCES, "chunking", 0.0)
    status, out, _ = run(capsys, "check", PERZYNA, "--load", short_load)
    assert status == 1 and parse_check(out)["chunking"][2] == "FAIL"


# ---------------------------------------------------------------------------------- simulate


def simulate(capsys, tmp_path, name, *extra, card=PERZYNA, load=LOAD):
    out = tmp_path / name
    status, stdout, err = run(capsys, "simulate", card, "--load", load, "--out", out, *extra)
    assert status == 0, err
    return out, out.with_name(out.stem + ".params.csv")


def read_params(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    return header, [r[0] for r in rows], torch.tensor([[float(x) for x in r[1:]] for r in rows])


def test_simulate_writes_k_specimens_and_their_parameters(capsys, tmp_path):
    data, params = simulate(capsys, tmp_path, "data.csv", "--specimens", 4, "--seed", 7)
    experiments = read_experiments(data)
    assert experiments.specimens == ("S001", "S002", "S003", "S004")
    assert experiments.n_points == (151,) * 4
    assert torch.isfinite(experiments.stress).all()
    assert experiments.stress.abs().max() > 300  # it yields, hardens, relaxes
    time, strain = informative_path()
    assert torch.allclose(experiments.time, time[:, None].expand(-1, 4), rtol=1e-11)
    header, ids, values = read_params(params)
    assert header == ["specimen", "E", "sy", "Rinf", "d", "eta", "n"]
    assert ids == list(experiments.specimens)
    drawn = draw_specimens(load_card(PERZYNA), 4, 7)
    assert torch.equal(values, torch.stack([drawn[k] for k in header[1:]], dim=-1))
    assert len(set(values[:, 1].tolist())) == 4  # sy varies by specimen
    assert (values[:, 0] == 200000.0).all() and (values[:, 5] == 3.0).all()  # fixed E, n


def test_same_seed_same_files_other_seed_other_files(capsys, tmp_path, short_load):
    def files(name, seed):
        return simulate(capsys, tmp_path, name, "--specimens", 3, "--seed", seed, "--noise", 1,
                        load=short_load)

    a, b, c = files("a.csv", 5), files("b.csv", 5), files("c.csv", 6)
    assert a[0].read_bytes() == b[0].read_bytes() and a[1].read_bytes() == b[1].read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes() and a[1].read_bytes() != c[1].read_bytes()


def test_all_fixed_card_gives_identical_specimens(capsys, tmp_path, short_load):
    card = tmp_path / "fixed.toml"
    values = dict(E=200000.0, sy=250.0, Rinf=200.0, d=15.0, C=20000.0, g=150.0, eta=300.0, n=3.0)
    card.write_text('[model]\nname = "chaboche"\n' + "".join(
        f"[parameters.{k}]\nvalue = {v}\n" for k, v in values.items()))
    data, params = simulate(capsys, tmp_path, "fixed.csv", "--specimens", 3, card=card,
                            load=short_load)
    stress = read_experiments(data).stress
    assert torch.equal(stress[:, 0], stress[:, 1]) and torch.equal(stress[:, 0], stress[:, 2])
    _, _, values = read_params(params)
    assert torch.equal(values, values[:1].expand(3, -1))


def test_noise_has_the_requested_sd(capsys, tmp_path):
    clean, _ = simulate(capsys, tmp_path, "clean.csv", "--specimens", 4, "--seed", 3)
    noisy, _ = simulate(capsys, tmp_path, "noisy.csv", "--specimens", 4, "--seed", 3, "--noise", 2)
    residual = read_experiments(noisy).stress - read_experiments(clean).stress
    assert residual.numel() == 604
    assert float(residual.std()) == pytest.approx(2.0, rel=0.15)
    assert abs(float(residual.mean())) < 0.3


def test_load_with_specimen_ids_gives_one_specimen_each(capsys, tmp_path):
    two = str(ROOT / "docs" / "examples" / "two-rates-load.csv")
    data, params = simulate(capsys, tmp_path, "two.csv", load=two)
    experiments = read_experiments(data)
    assert experiments.specimens == ("slow", "fast")
    assert experiments.labels == {"strain_rate": (1e-3, 1e-1)}
    assert read_params(params)[1] == ["slow", "fast"]
    # giving the matching number is fine too
    simulate(capsys, tmp_path, "two-again.csv", "--specimens", 2, load=two)
    assert (tmp_path / "two-again.csv").read_bytes() == data.read_bytes()


def test_load_with_a_stress_column_is_accepted(capsys, tmp_path):
    load = write_csv(tmp_path / "withstress.csv", ["time", "strain", "stress"],
                     [(0, 0, 0), (1, 0.0005, 5), (2, 0.001, 7)])
    data, _ = simulate(capsys, tmp_path, "out.csv", "--specimens", 2, load=load)
    experiments = read_experiments(data)
    assert experiments.specimens == ("S001", "S002")
    # simulated (elastic), not copied from the file
    assert experiments.stress[1, 0] == pytest.approx(100.0, rel=1e-9)


# ------------------------------------------------------------------------------- bad input


def one_line_error(capsys, argv, message):
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert err == f"bayescal: error: {message}\n"


def test_missing_card(capsys, tmp_path):
    card = tmp_path / "nope.toml"
    one_line_error(capsys, ["check", card], f"{card}: file not found")
    one_line_error(capsys, ["simulate", card, "--load", LOAD, "--out", tmp_path / "x.csv"],
                   f"{card}: file not found")
    assert not (tmp_path / "x.csv").exists()


def test_bad_card(capsys, tmp_path):
    card = tmp_path / "bad.toml"
    card.write_text(Path(PERZYNA).read_text().replace("value = 200000.0", 'value = "stiff"'))
    status, _, err = run(capsys, "check", card)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"bayescal: error: {card}: [parameters.E] value must be a finite number")
    card.write_text("[model\n")
    status, _, err = run(capsys, "check", card)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"bayescal: error: {card}: invalid TOML")


def test_unknown_model(capsys, tmp_path):
    card = tmp_path / "unknown.toml"
    card.write_text('[model]\nname = "johnson-cook"\n')
    one_line_error(capsys, ["check", card],
                   f"{card}: [model] unknown model 'johnson-cook' "
                   "(built-in models: chaboche, perzyna-voce, voce-jc, voce-jc-thermal)")


def test_missing_load_file(capsys, tmp_path):
    load = tmp_path / "nope.csv"
    one_line_error(capsys, ["simulate", PERZYNA, "--load", load, "--out", tmp_path / "x.csv"],
                   f"{load}: file not found")
    one_line_error(capsys, ["check", PERZYNA, "--load", load], f"{load}: file not found")


def test_specimen_count_must_match_the_ids_of_the_load(capsys, tmp_path):
    two = ROOT / "docs" / "examples" / "two-rates-load.csv"
    one_line_error(capsys, ["simulate", PERZYNA, "--load", two, "--specimens", 3,
                            "--out", tmp_path / "x.csv"],
                   f"{two}: has 2 specimen ids but 3 specimens were asked for (--specimens): "
                   "omit it or give 2")
    assert list(tmp_path.iterdir()) == []


def test_negative_noise_and_bad_counts(capsys, tmp_path, short_load):
    one_line_error(capsys, ["simulate", PERZYNA, "--load", short_load, "--noise", -1,
                            "--out", tmp_path / "x.csv"],
                   "the noise sd (--noise) must be a non-negative finite number, got -1")
    one_line_error(capsys, ["simulate", PERZYNA, "--load", short_load, "--specimens", 0,
                            "--out", tmp_path / "x.csv"],
                   "the number of specimens (--specimens) must be at least 1, got 0")
    one_line_error(capsys, ["--threads", 0, "models"], "--threads must be at least 1, got 0")
    assert not (tmp_path / "x.csv").exists()


def test_output_directory_is_created_and_must_not_be_a_file(capsys, tmp_path, short_load):
    out = tmp_path / "new" / "dir" / "data.csv"
    simulate(capsys, tmp_path, "new/dir/data.csv", load=short_load)
    assert read_experiments(out).specimens == ("S001",)
    assert (out.parent / "data.params.csv").is_file()
    one_line_error(capsys, ["simulate", PERZYNA, "--load", short_load, "--out", out.parent],
                   f"--out {out.parent}: is a directory (give a file name for the data CSV)")
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, _, err = run(capsys, "simulate", PERZYNA, "--load", short_load,
                         "--out", blocker / "data.csv")
    assert status == 2
    assert err == (f"bayescal: error: --out {blocker / 'data.csv'}: {str(blocker)!r} is a file, "
                   "not a folder\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable(capsys):
    one_line_error(capsys, ["check", PERZYNA, "--device", "cuda"],
                   "--device cuda: CUDA is not available on this machine (use --device cpu)")


def test_device_is_offered_only_where_it_is_used(capsys):
    """check and simulate integrate on --device; the other commands do not offer it."""
    for command in ("check", "simulate"):
        assert "--device" in run(capsys, command, "--help")[1]
    for command in ("fit", "predict", "summary", "models"):
        assert "--device" not in run(capsys, command, "--help")[1]


def test_usage_errors_exit_2(capsys):
    status, _, err = run(capsys, "simulate", PERZYNA)
    assert status == 2 and "required" in err
    status, _, err = run(capsys)
    assert status == 2
    status, _, err = run(capsys, "frobnicate")
    assert status == 2 and "invalid choice" in err


def test_common_options_before_or_after_the_command(capsys, tmp_path):
    """``--threads`` before or after the command name reaches torch (for a command that
    computes; ``models`` imports no torch)."""
    for argv in (["--threads", 2, "check", "--help"], ["check", "--help", "--threads", 2]):
        assert run(capsys, *argv)[0] == 0
    card = ROOT / "models" / "perzyna-voce.toml"
    status, _, err = run(capsys, "--threads", 2, "check", card, "--load", tmp_path / "none.csv")
    assert status == 2 and torch.get_num_threads() == 2, err
    status, _, err = run(capsys, "check", card, "--load", tmp_path / "none.csv", "--threads", 1)
    assert status == 2 and torch.get_num_threads() == 1, err
    assert torch.get_default_dtype() == torch.float64


def test_unexpected_errors_exit_1_with_a_hint(capsys, monkeypatch):
    import bayescal.cli as cli

    def boom(args):
        raise RuntimeError("something broke\nacross lines")

    monkeypatch.setitem(cli.COMMANDS, "models", (cli._add_models, boom))
    status, out, err = run(capsys, "models")
    assert status == 1
    assert err == ("bayescal: error: RuntimeError: something broke across lines "
                   "(rerun with --debug for the traceback)\n")
    with pytest.raises(RuntimeError, match="something broke"):
        main(["models", "--debug"])


# ------------------------------------------------------------------------------ fit, summary


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Three noisy specimens on a short informative path, written by ``bayescal simulate``."""
    folder = tmp_path_factory.mktemp("tiny")
    time, strain = informative_path(6)
    load = write_csv(folder / "load.csv", ["time", "strain"],
                     zip(map(repr, time.tolist()), map(repr, strain.tolist()), strict=True))
    out = folder / "data.csv"
    assert main(["simulate", PERZYNA, "--load", str(load), "--specimens", "3", "--seed", "2",
                 "--noise", "2", "--out", str(out)]) == 0
    return out


def test_fit_then_summary_from_the_command_line(capsys, tmp_path, tiny_data):
    out = tmp_path / "fit"
    capsys.readouterr()
    status, stdout, err = run(capsys, "fit", PERZYNA, "--data", tiny_data, "--method", "map",
                              "--draws", 5, "--seed", 4, "--out", out)
    assert status == 0, err
    assert f"wrote {out / 'posterior.nc'} (map, guide delta" in stdout
    for name in ("posterior.nc", "fit_bands.png", "elbo.png", "population.png"):
        assert (out / name).is_file(), name
    idata = az.from_netcdf(out / "posterior.nc")
    assert idata.posterior.attrs["command"] == (
        f"bayescal fit {PERZYNA} --data {tiny_data} --method map --draws 5 --seed 4 --out {out}")
    assert idata.posterior.attrs["seed"] == 4
    status, stdout, _ = run(capsys, "summary", out / "posterior.nc", "--population")
    assert status == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("method map (guide delta), model perzyna-voce, 1 chain(s) x 5 draws")
    assert lines[1].split() == ["mean", "sd", "hdi_5%", "hdi_95%"]
    assert [line.split()[0] for line in lines[2:]] == [
        "sy_pop_mean", "sy_pop_sd", "Rinf_pop_mean", "Rinf_pop_sd", "d_pop_mean", "d_pop_sd",
        "eta_pop_mean", "eta_pop_sd", "noise_sd"]


def test_fit_bad_options_and_inputs(capsys, tmp_path, tiny_data):
    out = tmp_path / "fit"
    one_line_error(capsys, ["fit", PERZYNA, "--data", tiny_data, "--steps", 0, "--out", out],
                   "--steps must be at least 1, got 0")
    one_line_error(capsys, ["fit", PERZYNA, "--data", tiny_data, "--lr", -0.1, "--out", out],
                   "--lr must be a positive finite number, got -0.1")
    one_line_error(capsys, ["fit", PERZYNA, "--data", tiny_data, "--draws", 0, "--out", out],
                   "--draws must be at least 1, got 0")
    one_line_error(capsys, ["fit", PERZYNA, "--data", tiny_data, "--method", "map",
                            "--guide", "mvn", "--out", out],
                   "--method map takes no --guide mvn (MAP is the delta guide)")
    one_line_error(capsys, ["fit", PERZYNA, "--data", tiny_data, "--method", "laplace",
                            "--guide", "delta", "--out", out],
                   "--method laplace needs a Gaussian --guide (normal, lowrank or mvn)")
    missing = tmp_path / "nope.csv"
    one_line_error(capsys, ["fit", PERZYNA, "--data", missing, "--out", out],
                   f"{missing}: file not found")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    one_line_error(capsys, ["fit", PERZYNA, "--data", tiny_data, "--out", blocker],
                   f"--out {blocker}: exists and is not a directory")
    for options, message in (
            (["--chains", 0], "--chains must be at least 1, got 0"),
            (["--max-tree-depth", 0], "--max-tree-depth must be at least 1, got 0"),
            (["--warmup", -1], "--warmup must be 0 or more, got -1"),
            (["--target-accept", 1.5], "--target-accept must lie between 0 and 1, got 1.5"),
            (["--guide", "normal"], "--method nuts takes no --guide normal (it starts from the "
                                    "full-rank Laplace or SVI approximation)")):
        one_line_error(capsys, ["fit", PERZYNA, "--data", tiny_data, "--method", "nuts",
                                *options, "--out", out], message)
    one_line_error(capsys, ["fit", PERZYNA, "--data", tiny_data, "--compile", "--out", out],
                   f"{PERZYNA}: --compile applies only to NEML2 cards "
                   '([model] backend = "neml2")')
    status, _, err = run(capsys, "fit", PERZYNA, "--data", tiny_data, "--method", "hmc",
                         "--out", out)
    assert status == 2 and "invalid choice: 'hmc'" in err
    assert not out.exists()


@pytest.mark.slow
def test_nuts_from_the_command_line_with_diagnostics(capsys, tmp_path, tiny_data):
    """Two chains in two processes, a few draws: the run, its stats and the summary's
    diagnostics (too few draws: the ESS warning must show)."""
    out = tmp_path / "nuts"
    capsys.readouterr()
    status, stdout, err = run(capsys, "fit", PERZYNA, "--data", tiny_data, "--method", "nuts",
                              "--centered", "--chains", 2, "--warmup", 10, "--samples", 10,
                              "--seed", 1, "--no-figures", "--out", out)
    assert status == 0, err
    assert f"wrote {out / 'posterior.nc'} (nuts, 2 chains x 10 draws after 10 warm-up" in stdout
    idata = az.from_netcdf(out / "posterior.nc")
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 10
    assert idata.sample_stats["diverging"].shape == (2, 10)
    assert idata.posterior.attrs["centered"] == "sy,Rinf,d,eta"
    assert idata.posterior.attrs["parameterisation"] == (
        "sy centered, Rinf centered, d centered, eta centered")
    status, stdout, _ = run(capsys, "summary", out / "posterior.nc", "--population")
    assert status == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("method nuts, model perzyna-voce, 2 chain(s) x 10 draws")
    assert lines[1].startswith("specimen level: sy centered, Rinf centered, d centered, "
                               "eta centered (specimen sd / population scale: sy ")
    assert lines[2].split()[-3:] == ["ess_bulk", "ess_tail", "r_hat"]
    assert any(line.startswith("warning: bulk ESS below 200 (100 per chain)") for line in lines)
    assert re.search(r"^\d+ of 20 transitions diverged \(\d+\.\d %\), \d+ solver failures "
                     r"rejected$", stdout, re.M)


def test_summary_of_a_file_that_is_not_a_posterior(capsys, tmp_path):
    missing = tmp_path / "none.nc"
    one_line_error(capsys, ["summary", missing], f"{missing}: no such file")
    junk = tmp_path / "junk.nc"
    junk.write_text("not netcdf")
    status, _, err = run(capsys, "summary", junk)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"bayescal: error: {junk}: not a readable netCDF InferenceData")
