"""Nothing lost, nothing silently wrong: a run killed at any point resumes to the same numbers; damaged or
mismatched files are recomputed with a warning; bad flags change nothing on disk; runs are bit-reproducible."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import main

ROOT = Path(__file__).resolve().parents[1]


def run_main(tmp_path, *flags, fault=None):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop(main.FAULT_ENV, None)
    if fault:
        env[main.FAULT_ENV] = fault
    cmd = [sys.executable, str(ROOT / "main.py"), "--quick", "--quiet", "--out", str(tmp_path / "out"),
           "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(ROOT / "data"), "--offline", "--skip-figures", *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)


def numbers(out_dir: Path) -> dict:
    """Every measured number of a run (not its timings, paths or dates)."""
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for m in metrics["models"].values():
        m["training"].pop("seconds")
        m["training"]["tracking"].pop("seconds")
        m["training"]["tracking"].pop("overhead")
    return {"models": metrics["models"], "connectivity": metrics["connectivity"], "surface": metrics["surface"],
            "data": metrics["data"]["sha256"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, the numbers every interrupted-and-resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    done = run_main(tmp)
    assert done.returncode == 0, done.stderr
    return numbers(tmp / "out")


@pytest.mark.parametrize("fault", ["train[seed=0]", "sharpness[seed=42]", "write:flatness_seed0.json",
                                   "connectivity", "write:metrics.json"])
def test_run_killed_at_any_point_resumes_to_identical_metrics(tmp_path, reference, fault):
    killed = run_main(tmp_path, fault=fault)
    assert killed.returncode == -signal.SIGKILL
    resumed = run_main(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert numbers(tmp_path / "out") == reference
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["resumed"], "the rerun must load what the killed run finished"


def test_kill_while_writing_metrics_leaves_the_previous_file_intact(tmp_path, reference):
    assert run_main(tmp_path).returncode == 0
    before = (tmp_path / "out" / "metrics.json").read_bytes()
    killed = run_main(tmp_path, "--fresh", fault="write:metrics.json")
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "out" / "metrics.json").read_bytes() == before


def test_same_configuration_twice_gives_bit_identical_numbers(tmp_path, reference):
    assert run_main(tmp_path, "--fresh").returncode == 0
    assert numbers(tmp_path / "out") == reference


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checkpoint_and_stage_files_are_recomputed_with_a_warning(tmp_path, reference, damage):
    assert run_main(tmp_path).returncode == 0
    folder = next((tmp_path / "runs").iterdir())
    for name in ("model_seed0.pt", "sharpness_seed0.json"):
        path = folder / name
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2] if damage == "truncate" else b"\x00garbage")
    rerun = run_main(tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "model_seed0.pt is damaged" in rerun.stderr and "sharpness_seed0.json is damaged" in rerun.stderr
    assert numbers(tmp_path / "out") == reference


def test_checkpoint_of_another_architecture_is_not_trusted(tmp_path):
    store = main.RunStore(tmp_path, fresh=False)
    small = torch.nn.Sequential(torch.nn.Linear(3, 2))
    store.save_model("model[seed=0]", "k", small, {"seconds": 0.0})
    other = torch.nn.Sequential(torch.nn.Linear(4, 2))
    assert store.load_model("model[seed=0]", "k", other) is None
    assert "another architecture" in store.warnings[0]
    store.save_json("surface", "k1", {"a": 1}, 0.5)
    assert store.load_json("surface", "k2") is None and "other settings" in store.warnings[1]
    assert store.load_json("surface", "k1") == {"result": {"a": 1}, "seconds": 0.5}


def test_fresh_recomputes_everything(tmp_path, reference):
    assert run_main(tmp_path).returncode == 0
    assert run_main(tmp_path, "--fresh").returncode == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["resumed"] == []


def test_bad_flag_leaves_existing_outputs_byte_for_byte(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"keep": true}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main.main(["--epochs", "-3", "--out", str(out), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == "error: --epochs must be a positive integer, got -3\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "runs").exists()


def test_corrupt_data_file_exits_1_with_one_line_and_no_traceback(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03corrupt")
    done = run_main(tmp_path, "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "train-images-idx3-ubyte" in done.stderr


def test_diverging_training_exits_1_naming_seed_epoch_step(tmp_path):
    done = run_main(tmp_path, "--lr", "1e6", "--seeds", "3", "4")
    assert done.returncode == 1
    assert "seed 3 diverged at epoch 1, step" in done.stderr and "lower the learning rate" in done.stderr


FLAG_VALUES = st.one_of(st.integers(-5, 50).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                        st.sampled_from(["", "abc", "0", "1", "-1", "mnist", "fashion-mnist", "cnn", "1e-3"]))
FLAGS = ["--epochs", "--lr", "--momentum", "--batch-size", "--seeds", "--surface-steps", "--surface-span",
         "--flatness-sigmas", "--flatness-samples", "--dataset", "--model", "--interpolation-points",
         "--sharpness-tol", "--memory-budget-mb", "--hidden", "--train-subset", "--threads"]


@settings(max_examples=200)
@given(pairs=st.lists(st.tuples(st.sampled_from(FLAGS), FLAG_VALUES), max_size=4))
def test_any_flag_values_parse_or_give_one_line_usage_error(pairs):
    """parse_args either returns a valid Config or raises UsageError whose message is one line naming a flag."""
    argv = [item for pair in pairs for item in pair]
    try:
        cfg = main.parse_args(argv)
    except main.UsageError as err:
        message = str(err)
        assert "\n" not in message and message
        return
    assert cfg.epochs >= 1 and cfg.lr > 0 and cfg.surface_steps >= 2 and len(set(cfg.seeds)) == len(cfg.seeds)


def test_under_a_profiler_the_run_exits_normally_so_the_profile_is_written(tmp_path):
    """main.py ends with os._exit (the interpreter's teardown of torch costs 0.3-0.45 s) except under a tracer or
    profiler, which writes its data at exit: `python -m cProfile -o FILE main.py` (here with a bad flag, so that
    it is quick) leaves FILE behind. (cProfile swallows the script's SystemExit: it exits 0 itself.)"""
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


def test_ctrl_c_exits_130_keeps_finished_stages_and_the_rerun_resumes(tmp_path, reference):
    cmd = [sys.executable, str(ROOT / "main.py"), "--quick", "--quiet", "--out", str(tmp_path / "out"),
           "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(ROOT / "data"), "--offline", "--skip-figures"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    start = time.monotonic()
    while not list((tmp_path / "runs").glob("*/model_seed0.pt")):  # interrupt once the first model is saved
        assert proc.poll() is None and time.monotonic() - start < 120, "the run ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "resume" in err and "Traceback" not in err
    assert run_main(tmp_path).returncode == 0
    assert numbers(tmp_path / "out") == reference


def test_a_run_loaded_under_another_module_name_works_and_never_imports_torch_dynamo(tmp_path, reference):
    """Loaded as a module that sys.modules does not know (as profilers and runpy load it), main.py still keys its
    stages on its own source (inspect.getsource would fail there) and gives the reference numbers; and
    torch._dynamo (2.1 s to import, pulled in by torch.optim's constructors) is never imported."""
    script = (
        "import runpy, sys\n"
        f"namespace = runpy.run_path({str(ROOT / 'main.py')!r}, run_name='landscape_under_test')\n"
        f"code = namespace['main'](['--quick', '--quiet', '--out', {str(tmp_path / 'out')!r}, '--runs-dir', "
        f"{str(tmp_path / 'runs')!r}, '--data-dir', {str(ROOT / 'data')!r}, '--offline', '--skip-figures'])\n"
        "assert code == 0, code\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "print('checked')\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)}
    env.pop(main.FAULT_ENV, None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("checked")
    assert numbers(tmp_path / "out") == reference
