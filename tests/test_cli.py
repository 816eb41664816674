"""Flags and their validation (experiment/cli.py through main.parse_args and main.main): every Config field is
a flag with its default in --help, --quick's budgets give way to explicit flags, and every bad value exits with
status 2 and one line naming the flag, before any work and without touching earlier outputs."""

import subprocess
import sys

import pytest
from helpers import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

import main
from experiment import cli


FLAG_VALUES = st.one_of(st.integers(-5, 50).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                        st.sampled_from(["", "abc", "0", "1", "-1", "mnist", "fashion-mnist", "cnn", "1e-3"]))


FLAGS = ["--epochs", "--lr", "--momentum", "--batch-size", "--seeds", "--surface-steps", "--surface-span",
         "--flatness-sigmas", "--flatness-samples", "--dataset", "--model", "--interpolation-points",
         "--sharpness-tol", "--memory-budget-mb", "--hidden", "--train-subset", "--threads"]


def test_flags_override_defaults_and_quick_budgets():
    cfg = main.parse_args(["--quick", "--epochs", "3", "--seeds", "1", "2", "3"])
    assert cfg.epochs == 3 and cfg.seeds == (1, 2, 3) and cfg.surface_steps == main.QUICK["surface_steps"]
    assert main.parse_args([]) == main.Config()


@pytest.mark.parametrize("argv, flag", [
    (["--epochs", "-3"], "--epochs must be a positive integer, got -3"),
    (["--epochs", "two"], "--epochs"),
    (["--seeds", "0", "0"], "--seeds must be distinct"),
    (["--surface-steps", "1"], "--surface-steps"),
    (["--surface-span", "0"], "--surface-span"),
    (["--flatness-sigmas", "-0.1"], "--flatness-sigmas"),
    (["--dataset", "cifar"], "--dataset"),
    (["--lr", "nan"], "--lr"),
    (["--trace-method", "exact", "--model", "cnn"], "--trace-method exact needs the ReLU MLP"),
    (["--shard-data", "--shard-points"], "choose one"),
    (["--sweep", "--shard-data"], "--shard-data and --shard-points are for the default run"),
    (["--shard-points"], "--shard-points spreads work over the processes torchrun starts"),
    (["--shard-data"], "--shard-data spreads work over the processes torchrun starts"),
    (["--seeds", "0", "99999999999999999999999"], "--seeds must be integers from 0 to 9223372036854775807"),
    (["--seeds", "-1", "2"], "--seeds must be integers from 0"),
    (["--probe-seed", str(2**63)], "--probe-seed must be an integer from 0 to 9223372036854775807"),
    (["--track-tol", "0"], "--track-tol must be in (0, 1)"),
    (["--layer-max-probes", "0"], "--layer-max-probes must be a positive integer"),
])
def test_bad_flags_exit_2_with_one_line(argv, flag, capsys, tmp_path):
    assert main.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and flag in err
    assert not (tmp_path / "o").exists()


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        main.parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for f in main.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in text
    assert "default: 0 42" in text


@pytest.mark.parametrize("flag", ["--out", "--runs-dir", "--data-dir"])
def test_a_folder_flag_naming_a_file_is_refused_before_any_work(tmp_path, capsys, flag):
    """Each folder the run writes is checked first: a file in its place is one line naming the flag, exit 2, and
    no other folder is created."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    folders = {"--out": tmp_path / "out", "--runs-dir": tmp_path / "runs", "--data-dir": tmp_path / "data"}
    folders[flag] = blocker / "sub"
    argv = ["--quick", "--offline", *[a for f, p in folders.items() for a in (f, str(p))]]
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {flag} must be a folder this run can write")
    assert blocker.read_text() == "x" and not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_unwritable_output_folder_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main.main(["--quick", "--out", str(blocker / "sub")]) == 2
    assert "--out" in capsys.readouterr().err


def test_bad_flag_leaves_existing_outputs_byte_for_byte(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"keep": true}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main.main(["--epochs", "-3", "--out", str(out), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == "error: --epochs must be a positive integer, got -3\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "runs").exists()


@settings(max_examples=200)
@given(pairs=st.lists(st.tuples(st.sampled_from(FLAGS), FLAG_VALUES), max_size=4))
def test_any_flag_values_parse_or_give_one_line_usage_error(pairs):
    """parse_args either returns a valid Config or raises UsageError whose message is one line naming a flag."""
    argv = [item for pair in pairs for item in pair]
    try:
        cfg = main.parse_args(argv)
    except cli.UsageError as err:
        message = str(err)
        assert "\n" not in message and message
        return
    assert cfg.epochs >= 1 and cfg.lr > 0 and cfg.surface_steps >= 2 and len(set(cfg.seeds)) == len(cfg.seeds)


def test_under_a_profiler_the_run_exits_normally_so_the_profile_is_written(tmp_path):
    """A profiler writes its data when the interpreter exits: `python -m cProfile -o FILE main.py` (here with a bad
    flag, so that it is quick) leaves FILE behind. (cProfile swallows the script's SystemExit: it exits 0 itself.)"""
    profile = tmp_path / "main.prof"
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), str(ROOT / "main.py"), "--epochs",
                           "x", "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.stderr.startswith("error: argument --epochs")
    assert profile.exists() and profile.stat().st_size > 0


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--momentum", "1"], ["--hidden", "0"], ["--nonsense"],
                                  ["--seeds", "5"], ["--surface-span", "inf"], ["--threads", "-1"]])
def test_bad_flags_as_a_user_sees_them(tmp_path, argv):
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), *argv, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert done.stdout == "" and not (tmp_path / "o").exists()


def test_the_seed_range_is_what_torch_and_numpy_accept():
    """Both ends of the accepted range seed a torch generator and numpy's default_rng; one past it is refused."""
    import numpy as np
    import torch

    low, high = cli.SEED_RANGE
    for seed in (low, high):
        torch.Generator().manual_seed(seed)
        np.random.default_rng(seed)
    assert main.parse_args(["--seeds", str(low), str(high), "--probe-seed", str(high)]).seeds == (low, high)
    with pytest.raises(cli.UsageError, match="--probe-seed"):
        main.parse_args(["--probe-seed", str(high + 1)])
