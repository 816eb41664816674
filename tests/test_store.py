"""The stage store: a run killed at any point resumes to the same numbers; a stage is recomputed exactly when its
settings, inputs or code change; damaged files are recomputed with a warning; runs are bit-reproducible."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_main
from hypothesis import given
from hypothesis import strategies as st

import main
from landscape import files
from landscape.store import CodeIndex, Keyed, Store, canonical_json, content_sha256


def numbers(out_dir: Path) -> dict:
    """Every measured number of a run (not its timings, paths or dates)."""
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for m in metrics["models"].values():
        m["training"].pop("seconds")
        m["training"]["tracking"].pop("seconds")
        m["training"]["tracking"].pop("overhead")
    return {"models": metrics["models"], "connectivity": metrics["connectivity"], "surface": metrics["surface"],
            "data": metrics["data"]["sha256"]}


def resumed(out_dir: Path) -> list[str]:
    return json.loads((out_dir / "metrics.json").read_text())["resumed"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, the numbers every interrupted-and-resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    done = run_main(tmp)
    assert done.returncode == 0, done.stderr
    return numbers(tmp / "out")


# (when, file name pattern, which occurrence): killed just before or just after that file is moved into place
FAULTS = {"after the first model": ("after", r"^model\.pt$", 1),
          "after the second model's sharpness": ("after", r"^sharpness\.", 2),
          "while writing the first flatness": ("before", r"^flatness\.", 1),
          "after connectivity": ("after", r"^connectivity\.", 1),
          "while writing metrics.json": ("before", r"^metrics\.json$", 1)}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_run_killed_at_any_point_resumes_to_identical_metrics(tmp_path, reference, fault):
    killed = run_main(tmp_path, fault=FAULTS[fault])
    assert killed.returncode == -signal.SIGKILL
    again = run_main(tmp_path)
    assert again.returncode == 0, again.stderr
    assert numbers(tmp_path / "out") == reference
    assert resumed(tmp_path / "out"), "the rerun must load what the killed run finished"


@pytest.mark.slow
def test_kill_while_writing_metrics_leaves_the_previous_file_intact(tmp_path, reference):
    assert run_main(tmp_path).returncode == 0
    before = (tmp_path / "out" / "metrics.json").read_bytes()
    killed = run_main(tmp_path, "--fresh", fault=FAULTS["while writing metrics.json"])
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "out" / "metrics.json").read_bytes() == before


@pytest.mark.slow
def test_same_configuration_twice_gives_bit_identical_numbers(tmp_path, reference):
    assert run_main(tmp_path, "--fresh").returncode == 0
    assert numbers(tmp_path / "out") == reference


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checkpoint_and_stage_files_are_recomputed_with_a_warning(tmp_path, reference, damage):
    assert run_main(tmp_path).returncode == 0
    damaged = [*(tmp_path / "runs").glob("*/model.pt"), *(tmp_path / "runs").glob("*/sharpness.*.json")]
    assert len(damaged) == 4
    for path in damaged:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2] if damage == "truncate" else b"\x00garbage")
    rerun = run_main(tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.count("model.pt is damaged") == 2 and rerun.stderr.count(".json is damaged") == 2
    assert numbers(tmp_path / "out") == reference


@dataclass(frozen=True)
class Width:
    width: int


def build_linear(s: Width) -> torch.nn.Module:
    return torch.nn.Linear(3, s.width)


def fit_nothing(s: Width, model, *, data) -> dict:
    return {"seconds": 0.0, "rows": int(data.shape[0])}


def count_rows(s: Width, *, data) -> dict:
    return {"rows": int(data.shape[0]), "width": s.width}


def test_a_checkpoint_that_holds_another_architecture_is_not_trusted(tmp_path):
    """A model.pt whose key matches but whose weights do not fit the architecture is recomputed, with a warning."""
    inputs = {"data": Keyed(torch.zeros(5, 3), "five rows")}

    def store():
        return Store(tmp_path, code=CodeIndex(ROOT), environment={})

    first = store()
    model, history = first.trained(build_linear, fit_nothing, Width(2), inputs, label="train")
    assert history == {"seconds": 0.0, "rows": 5} and first.loaded == []
    path = tmp_path / model.key / "model.pt"
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = torch.nn.Linear(4, 2).state_dict()
    payload["sha256"] = content_sha256(payload)  # a sound file of another architecture, not a damaged one
    torch.save(payload, path)
    second = store()
    again, _ = second.trained(build_linear, fit_nothing, Width(2), inputs, label="train")
    assert second.loaded == [] and "holds another architecture" in second.warnings[0]
    assert again.key == model.key
    third = store()
    third.trained(build_linear, fit_nothing, Width(2), inputs, label="train")
    assert third.loaded == ["train"] and third.warnings == []


def test_each_setting_has_its_own_file_and_a_stage_reruns_only_for_new_settings_or_inputs(tmp_path):
    data = {"data": Keyed(torch.zeros(5, 3), "five rows")}
    store = Store(tmp_path, code=CodeIndex(ROOT), environment={})
    a = store.run(count_rows, Width(2), "subject", data, label="a")
    b = store.run(count_rows, Width(3), "subject", data, label="b")
    c = store.run(count_rows, Width(2), "subject", data, label="c")
    d = store.run(count_rows, Width(2), "subject", {"data": Keyed(torch.zeros(4, 3), "four rows")}, label="d")
    assert store.loaded == ["c"]
    assert a.value == c.value == {"rows": 5, "width": 2} and b.value["width"] == 3 and d.value["rows"] == 4
    assert a.key == c.key and len({a.key, b.key, d.key}) == 3
    files = sorted(p.name for p in (tmp_path / "subject").iterdir())
    assert files == sorted(f"count_rows.{key}.json" for key in (a.key, b.key, d.key))
    saved = json.loads((tmp_path / "subject" / f"count_rows.{b.key}.json").read_text())
    assert saved["settings"] == {"width": 3} and saved["inputs"] == {"data": "five rows"}


@pytest.mark.slow
def test_fresh_recomputes_everything(tmp_path, reference):
    assert run_main(tmp_path).returncode == 0
    assert run_main(tmp_path, "--fresh").returncode == 0
    assert resumed(tmp_path / "out") == []


@pytest.mark.slow
def test_ctrl_c_exits_130_keeps_finished_stages_and_the_rerun_resumes(tmp_path, reference):
    cmd = [sys.executable, str(ROOT / "main.py"), "--quick", "--quiet", "--out", str(tmp_path / "out"),
           "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(ROOT / "data"), "--offline", "--skip-figures"]
    # SIGINT back to its default in the child: a runner that starts the suite in the background hands it down
    # ignored, and Python then never installs the handler that turns it into KeyboardInterrupt
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    start = time.monotonic()
    while not list((tmp_path / "runs").glob("*/model.pt")):  # interrupt once the first model is saved
        assert proc.poll() is None and time.monotonic() - start < 120, "the run ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "resume" in err and "Traceback" not in err
    assert run_main(tmp_path).returncode == 0
    assert numbers(tmp_path / "out") == reference


@pytest.mark.slow
def test_a_run_loaded_under_another_module_name_works_and_never_imports_torch_dynamo(tmp_path, reference):
    """Loaded as a module that sys.modules does not know (as profilers and runpy load it), main.py still keys its
    stages on its own source and gives the reference numbers; and torch._dynamo (2.1 s to import, pulled in by
    torch.optim's constructors) is never imported."""
    script = (
        "import runpy, sys\n"
        f"namespace = runpy.run_path({str(ROOT / 'main.py')!r}, run_name='landscape_under_test')\n"
        f"code = namespace['main'](['--quick', '--quiet', '--out', {str(tmp_path / 'out')!r}, '--runs-dir', "
        f"{str(tmp_path / 'runs')!r}, '--data-dir', {str(ROOT / 'data')!r}, '--offline', '--skip-figures'])\n"
        "assert code == 0, code\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "print('checked')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env={**main_env(), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("checked")
    assert numbers(tmp_path / "out") == reference


def main_env() -> dict:
    import os

    return {**os.environ, "PYTHONHASHSEED": "0"}


# ----------------------------------------------------------------------------- what recomputes what
PROJECT = ("main.py", "models.py", "data.py", "training.py", "utils.py", "plotting.py", "landscape", "experiment")


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory):
    """A copy of the project's code to edit, a runs folder and one finished --quick run in it."""
    root = tmp_path_factory.mktemp("project")
    for name in PROJECT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    assert run_copy(root, "first").returncode == 0
    return root


def run_copy(root: Path, out: str, *flags, quiet: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(root / "main.py"), "--quick", *(["--quiet"] if quiet else []), "--offline", "--skip-figures",
           "--out", str(root / out), "--runs-dir", str(root / "runs"), "--data-dir", str(ROOT / "data"), *flags]
    done = subprocess.run(cmd, env=main_env(), capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def labels(root: Path, out: str) -> set[str]:
    metrics = json.loads((root / out / "metrics.json").read_text())
    return set(metrics["timings"]) - {"load_data", "plots"}


@pytest.mark.slow
def test_an_unchanged_rerun_and_a_docstring_or_comment_edit_recompute_nothing(project_copy):
    root = project_copy
    run_copy(root, "same")
    everything = labels(root, "same")
    assert set(resumed(root / "same")) == everything
    edit(root / "landscape" / "spectrum.py", '"""One Lanczos run from a seeded',
         '"""One Lanczos run (an edited docstring) from a seeded')
    edit(root / "utils.py", "This module is the public interface;", "# a comment\nThis module is the public interface;")
    edit(root / "landscape" / "hessian.py", "class MLPHessian(HessianOperator):",
         "class MLPHessian(HessianOperator):  # a comment")
    run_copy(root, "documented")
    assert set(resumed(root / "documented")) == everything


@pytest.mark.slow
def test_editing_a_helper_recomputes_exactly_the_stages_that_call_it(project_copy):
    """_slq_density is run by the spectrum stage alone, whose result the local-entropy stage reads (so it is
    recomputed too); build_model by the training of every seed, on which every other stage depends."""
    root = project_copy
    run_copy(root, "before")
    everything = labels(root, "before")
    edit(root / "landscape" / "spectrum.py", "    runs = len(results)\n", "    runs = len(results)\n    assert runs\n")
    run_copy(root, "helper")
    assert everything - set(resumed(root / "helper")) == {"spectrum[seed=0]", "spectrum[seed=42]",
                                                          "local_entropy[seed=0]", "local_entropy[seed=42]"}
    edit(root / "experiment" / "stages.py", "    generator = torch.Generator().manual_seed(s.seed)\n",
         "    generator = torch.Generator().manual_seed(s.seed)\n    assert generator\n")
    run_copy(root, "model")
    assert resumed(root / "model") == []


@pytest.mark.slow
def test_changing_a_seed_recomputes_only_that_seeds_stages_and_the_pairwise_ones(project_copy):
    root = project_copy
    run_copy(root, "seeds")
    run_copy(root, "other seed", "--seeds", "0", "7")
    again = set(resumed(root / "other seed"))
    computed = labels(root, "other seed") - again
    assert {label for label in computed if "[seed=" in label} == {label for label in labels(root, "other seed")
                                                                  if label.endswith("[seed=7]")}
    assert {label for label in computed if "[seed=" not in label} == {"connectivity", "aligned", "bezier"}
    assert {"train[seed=0]", "sharpness[seed=0]", "surface", "reparametrisation"} <= again


@pytest.mark.slow
def test_changing_one_setting_recomputes_the_stages_that_read_it(project_copy):
    root = project_copy
    run_copy(root, "settings")
    run_copy(root, "surface", "--surface-steps", "7")
    assert labels(root, "surface") - set(resumed(root / "surface")) == {"surface"}


@pytest.mark.slow
def test_prune_deletes_the_files_this_run_did_not_use_and_lists_them(project_copy):
    """Without --prune a run says how many files it left unused; with it, it deletes them (naming each), so
    that the store holds one file per stage of this run, all of which it loaded."""
    root, runs = project_copy, project_copy / "runs"
    run_copy(root, "extra", "--surface-steps", "9")  # a stage file the default run does not use
    told = run_copy(root, "told", quiet=False)
    assert "this run did not use" in told.stderr and "--prune deletes them" in told.stderr
    extra = [p for p in runs.rglob("surface.*.json") if json.loads(p.read_text())["settings"]["surface_steps"] == 9]
    assert len(extra) == 1
    pruned = run_copy(root, "pruned", "--prune", quiet=False)
    assert f"pruned {extra[0]}" in pruned.stderr and not extra[0].exists()
    left = [p for p in runs.rglob("*") if p.is_file()]
    assert len(left) == len(labels(root, "pruned"))  # one file per stage: each model.pt and each stage's result
    assert set(resumed(root / "pruned")) == labels(root, "pruned")


@pytest.mark.slow
def test_a_stage_that_reads_earlier_results_is_recomputed_when_they_change(tmp_path):
    """The exact-mode comparison reads the trace stage: rerunning in the same runs folder with another
    --trace-method must recompute both, not compare the old comparison's numbers with the new trace."""
    base = ["--quick", "--quiet", "--hidden", "3", "3", "--runs-dir", str(tmp_path / "runs"), "--offline",
            "--skip-figures"]
    assert main.main([*base, "--out", str(tmp_path / "a"), "--trace-method", "auto"]) == 0
    assert main.main([*base, "--out", str(tmp_path / "b"), "--trace-method", "hutch++"]) == 0
    second = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert not any(name.startswith(("trace[", "exact[")) for name in second["resumed"])
    assert any(name.startswith("sharpness[") for name in second["resumed"])
    for m in second["models"].values():
        assert m["trace"]["method"] == "hutch++"
        assert m["exact"]["errors"]["trace_in_stderr"] is not None
        assert m["exact"]["errors"]["trace"] == pytest.approx(abs(m["trace"]["trace"] - m["exact"]["trace"]))


# ----------------------------------------------------------------------------- code digests
def write_project(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def stage_digest(folder: Path, module: str, function: str) -> tuple[str, list[str]]:
    """The digest and the definitions of `module.function`, from a fresh interpreter of the files on disk."""
    script = ("import sys, json\n"
              f"sys.path.insert(0, {str(folder)!r}); sys.path.insert(0, {str(ROOT)!r})\n"
              "from landscape.store import CodeIndex\n"
              f"import {module}\n"
              f"index = CodeIndex({str(folder)!r})\n"
              f"f = {module}.{function}\n"
              "print(json.dumps([index.digest(f), index.definitions(f)]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(json.loads(done.stdout))


HELPERS = '''"""Helpers."""
import math

SCALE = 2.0


def used(x):
    """Docstring."""
    return math.sqrt(x) * SCALE


def unused(x):
    return x + 1


class Operator:
    def apply(self, x):
        return used(x)
'''
STAGES = '''"""Stages."""
import pkg.helpers as helpers
from pkg.helpers import Operator


def stage(s, *, x):
    return helpers.used(x) + Operator().apply(x)
'''


@pytest.mark.parametrize("change, recomputes", [
    (("def used(x):\n    \"\"\"Docstring.\"\"\"", "def used(x):\n    \"\"\"Another docstring.\"\"\"  # and a comment"), False),
    (("def unused(x):\n    return x + 1", "def unused(x):\n    return x + 2"), False),
    (("    return math.sqrt(x) * SCALE", "    return math.sqrt(x) * SCALE * 1"), True),
    (("SCALE = 2.0", "SCALE = 3.0"), True),
    (("class Operator:\n    def apply(self, x):\n        return used(x)",
      "class Operator:\n    def apply(self, x):\n        return used(x) + 0"), True),
])
def test_a_code_digest_covers_what_a_stage_can_run_and_nothing_else(tmp_path, change, recomputes):
    """Through an imported module's attribute (helpers.used), a name imported from a module (Operator), a class's
    methods and a module constant; not through another function of the same file or through docstrings."""
    write_project(tmp_path, {"pkg/__init__.py": "", "pkg/helpers.py": HELPERS, "pkg/stages.py": STAGES})
    before, definitions = stage_digest(tmp_path, "pkg.stages", "stage")
    assert definitions == ["pkg/helpers.py:Operator", "pkg/helpers.py:SCALE", "pkg/helpers.py:used",
                           "pkg/stages.py:stage"]
    helpers = tmp_path / "pkg" / "helpers.py"
    helpers.write_text(helpers.read_text().replace(*change))
    after, _ = stage_digest(tmp_path, "pkg.stages", "stage")
    assert (after != before) == recomputes


# ----------------------------------------------------------------------------- nothing damaged is trusted
@dataclass(frozen=True)
class Scale:
    factor: float


def measure(s: Scale, *, data) -> dict:
    return {"eigenvalue": float(data.sum()) * s.factor, "converged": True, "iterations": 7, "curve": [0.5, 1.5]}


def echo(s: Width, *, data):
    return data


DATA = {"data": Keyed(torch.arange(6.0).reshape(2, 3), "six numbers")}


def new_store(root: Path) -> Store:
    return Store(root, code=CodeIndex(ROOT), environment={})


def edited(path: Path, change, *, checksum: bool) -> None:
    """Rewrite a stage file's JSON through `change(payload)`; with `checksum`, as a sound file (its checksum
    made to match), so that only the check after the checksum can refuse it."""
    payload = json.loads(path.read_text())
    change(payload)
    if checksum:
        payload["sha256"] = content_sha256({k: v for k, v in payload.items() if k != "sha256"})
    path.write_text(json.dumps(payload))


def flip_a_digit(path: Path) -> None:
    text = path.read_text()
    at = text.index('"eigenvalue": ') + len('"eigenvalue": ')
    path.write_text(text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:])


JSON_DAMAGE = {
    "an empty result": (lambda p: edited(p, lambda d: d.update(result={}), checksum=False), "does not match its checksum"),
    "a string where a number was": (lambda p: edited(p, lambda d: d["result"].update(eigenvalue="oops"), checksum=False),
                                    "does not match its checksum"),
    "a flipped digit": (flip_a_digit, "does not match its checksum"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "cannot be read: JSONDecodeError"),
    "garbage": (lambda p: p.write_bytes(b"\x00\xffgarbage"), "cannot be read: UnicodeDecodeError"),
    "a list, not a record": (lambda p: p.write_text("[1, 2]"), "holds a list, not a stage's record"),
    "no result, checksum matching": (lambda p: edited(p, lambda d: d.pop("result"), checksum=True), "holds no result"),
    "text for seconds, checksum matching": (lambda p: edited(p, lambda d: d.update(seconds="oops"), checksum=True),
                                            "has no time in seconds"),
    "another stage's key, checksum matching": (lambda p: edited(p, lambda d: d.update(key="0" * 16), checksum=True),
                                               "holds another stage's key"),
}


@pytest.mark.parametrize("damage", list(JSON_DAMAGE))
def test_a_damaged_stage_file_is_recomputed_with_one_warning_naming_it(tmp_path, damage):
    damage_file, why = JSON_DAMAGE[damage]
    first = new_store(tmp_path).run(measure, Scale(2.0), "subject", DATA, label="sharpness")
    path = tmp_path / "subject" / f"measure.{first.key}.json"
    damage_file(path)
    second = new_store(tmp_path)
    again = second.run(measure, Scale(2.0), "subject", DATA, label="sharpness")
    assert second.loaded == [] and second.computed == ["sharpness"]
    assert second.warnings == [f"{path} is damaged ({why}); recomputing it"]
    assert again.value == first.value == {"eigenvalue": 30.0, "converged": True, "iterations": 7, "curve": [0.5, 1.5]}
    third = new_store(tmp_path)
    assert third.run(measure, Scale(2.0), "subject", DATA, label="sharpness").value == first.value
    assert third.loaded == ["sharpness"] and third.warnings == []


def test_a_stage_file_without_a_checksum_is_recomputed_once_without_a_warning(tmp_path):
    """As every file written before files held checksums: recomputed, listed in `outdated`, then loaded."""
    first = new_store(tmp_path).run(measure, Scale(2.0), "subject", DATA, label="sharpness")
    path = tmp_path / "subject" / f"measure.{first.key}.json"
    edited(path, lambda d: d.pop("sha256"), checksum=False)
    second = new_store(tmp_path)
    assert second.run(measure, Scale(2.0), "subject", DATA, label="sharpness").value == first.value
    assert second.computed == ["sharpness"] and second.outdated == [path] and second.warnings == []
    third = new_store(tmp_path)
    third.run(measure, Scale(2.0), "subject", DATA, label="sharpness")
    assert third.loaded == ["sharpness"] and third.outdated == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=3) | st.integers(-20, 20), inner, max_size=3),
    max_leaves=12)


@given(value=json_values)
def test_every_json_result_a_stage_returns_is_loaded_back_as_written_and_never_called_damaged(value):
    """Tuples come back as lists and integer keys as strings (JSON's own rules); the checksum is taken of the
    value as it reads back, so no sound file is ever refused."""
    with tempfile.TemporaryDirectory() as folder:
        computed = new_store(Path(folder)).run(echo, Width(1), "subject", {"data": Keyed(value, "v")}, label="echo")
        store = new_store(Path(folder))
        loaded = store.run(echo, Width(1), "subject", {"data": Keyed(value, "v")}, label="echo")
    assert store.loaded == ["echo"] and store.warnings == []
    assert canonical_json(loaded.value) == canonical_json(computed.value)


def resave(path: Path, change, *, checksum: bool) -> None:
    """Rewrite a model.pt through `change(payload)`, keeping its old checksum or (with `checksum`) a matching one."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    if checksum:
        payload["sha256"] = content_sha256(payload)
    torch.save(payload, path)


def nudge_a_weight(payload: dict) -> None:
    weight = payload["state_dict"]["weight"]
    weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))


def flip_a_bit_of_a_weight(path: Path) -> None:
    """One bit of the weight's bytes where they lie in the file (torch's zip stores tensors uncompressed)."""
    raw = bytearray(path.read_bytes())
    weight = torch.load(path, weights_only=True)["state_dict"]["weight"].numpy().tobytes()
    assert raw.count(weight) == 1
    raw[raw.index(weight)] ^= 0x01
    path.write_bytes(bytes(raw))


MODEL_DAMAGE = {
    "a history without seconds": (lambda p: resave(p, lambda d: d["history"].pop("seconds"), checksum=False),
                                  "does not match its checksum"),
    "a history without seconds, checksum matching": (
        lambda p: resave(p, lambda d: d["history"].pop("seconds"), checksum=True), "has no time in seconds"),
    "a weight one ulp off": (lambda p: resave(p, nudge_a_weight, checksum=False), "does not match its checksum"),
    "float64 weights, checksum matching": (
        lambda p: resave(p, lambda d: d.update(state_dict={k: v.double() for k, v in d["state_dict"].items()}),
                         checksum=True),
        "holds another architecture (weight: torch.float64 (2, 3), the model has torch.float32 (2, 3))"),
    "a missing bias, checksum matching": (lambda p: resave(p, lambda d: d["state_dict"].pop("bias"), checksum=True),
                                          "holds another architecture (other parameter names)"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:200]), "cannot be read: RuntimeError"),
    "a flipped bit in a weight": (flip_a_bit_of_a_weight, "does not match its checksum"),
}


@pytest.mark.parametrize("damage", list(MODEL_DAMAGE))
def test_a_damaged_checkpoint_is_retrained_with_one_warning_naming_it(tmp_path, damage):
    damage_file, why = MODEL_DAMAGE[damage]
    inputs = {"data": Keyed(torch.zeros(5, 3), "five rows")}
    model, history = new_store(tmp_path).trained(build_linear, fit_nothing, Width(2), inputs, label="train")
    path = tmp_path / model.key / "model.pt"
    damage_file(path)
    second = new_store(tmp_path)
    again, again_history = second.trained(build_linear, fit_nothing, Width(2), inputs, label="train")
    assert second.loaded == [] and second.computed == ["train"] and again_history == history
    retrained = {k: v.clone() for k, v in again.value.state_dict().items()}
    (warning,) = second.warnings
    assert warning.startswith(f"{path} is damaged ({why}") and warning.endswith("); recomputing it")
    third = new_store(tmp_path)
    loaded, _ = third.trained(build_linear, fit_nothing, Width(2), inputs, label="train")
    assert third.loaded == ["train"] and third.warnings == []
    for name, tensor in loaded.value.state_dict().items():
        assert torch.equal(tensor, retrained[name])


def refuse_with(code: int):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return refuse


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_while_saving_a_stage_or_a_model_is_one_line_and_changes_nothing(
        tmp_path, monkeypatch, code):
    """torch.save straight into a file on a full disk fails with `RuntimeError: [enforce fail at
    inline_container.cc]`; the store serialises to memory first, so the disk's refusal is the writer's OSError."""
    inputs = {"data": Keyed(torch.zeros(5, 3), "five rows")}
    store = new_store(tmp_path)
    store.run(measure, Scale(2.0), "subject", DATA, label="sharpness")
    store.trained(build_linear, fit_nothing, Width(2), inputs, label="train")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(files.os, "fsync", refuse_with(code))
    with pytest.raises(files.WriteError) as stage:
        store.run(measure, Scale(3.0), "subject", DATA, label="sharpness")
    with pytest.raises(files.WriteError) as model:
        store.trained(build_linear, fit_nothing, Width(3), inputs, label="train")
    words = files.CAUSES[code]
    assert str(stage.value).startswith(f"cannot write {tmp_path / 'subject' / 'measure.'}") and str(stage.value).endswith(words)
    assert str(model.value).startswith(f"cannot write {tmp_path}") and str(model.value).endswith(f"model.pt: {words}")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_opening_a_store_removes_what_killed_writers_left_and_nothing_else(tmp_path):
    new_store(tmp_path).run(measure, Scale(2.0), "subject", DATA, label="sharpness")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    left = tmp_path / "subject" / f".measure.0123456789abcdef.json.{files._host_tag()}-{ended.pid}.k2j3h4g5.tmp"
    left.write_bytes(b"half a result")
    store = new_store(tmp_path)
    assert store.removed_temporaries == [left] and not left.exists()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
