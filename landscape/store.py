"""The stage store: every finished stage of every run kept on disk, found again by what it was computed from.

A stage is a pure function `stage(settings, **inputs)`: `settings` is a small frozen dataclass (the only
configuration the stage can read) and each input is a `Keyed` value, a value with a key that names how it
was made. The store derives the stage's key from exactly these: the settings' fields, the inputs' keys, a
digest of the source of the code the stage can run (`CodeIndex`) and the environment (torch's version and
thread count, on which the rounding depends). A stage whose key has a file is loaded, any other is computed
and saved. So editing a setting, a seed or a helper that a stage calls recomputes that stage and what reads
its result, and nothing else; a docstring or comment edit recomputes nothing.

Layout: runs/<subject>/<stage>.<key>.json, one folder per trained model (with its model.pt) and one per
pair of models; every file records its stage, settings and input keys. Files no run uses any more (old
settings, old code) stay until `prune` removes them.

Nothing damaged is trusted: every file also holds the sha256 of everything else it holds (`content_sha256`:
the canonical JSON of the payload, and for a model.pt each tensor's name, dtype, shape and bytes), checked on
every load, and a model's weights must match the built model's names, shapes and dtypes. A file that fails
(truncated, edited, `"result": {}`, a string where a number was) is recomputed with one warning naming it; a
file written before files held a checksum is recomputed once, listed in `outdated`, without a warning.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import io
import json
import logging
import math
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from landscape.files import make_folder, remove_stale_temporaries, write_bytes_atomic

log = logging.getLogger("landscape")
KEY_LENGTH = 16  # hex digits of sha256: 64 bits, no collision in any plausible store


def digest(*parts) -> str:
    """A short stable hash of JSON-able parts (non-JSON values by their str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:KEY_LENGTH]


def canonical_json(value) -> str:
    """`value` as JSON once written and read back (tuples as lists, keys as strings), keys sorted: the same text
    for the value a stage returned and for the value loaded from its file."""
    return json.dumps(json.loads(json.dumps(value)), sort_keys=True)


def content_sha256(payload: dict) -> str:
    """sha256 of a stored payload without its own "sha256": the canonical JSON of its plain fields, then each
    tensor of its "state_dict" (if any) by name, dtype, shape and bytes."""
    tensors = payload.get("state_dict") or {}
    plain = {name: value for name, value in payload.items() if name not in ("sha256", "state_dict")}
    h = hashlib.sha256(canonical_json(plain).encode())
    for name, tensor in tensors.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {flat.dtype} {tuple(tensor.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Damaged(ValueError):
    """A stored file that must not be trusted; the message says why, after the file's name."""


class Outdated(ValueError):
    """A stored file written before files held a checksum: recomputed once, without a warning."""


def _checked(payload, key: str) -> dict:
    """`payload` if it is a dict for `key` whose checksum matches its content, else Damaged or Outdated."""
    if not isinstance(payload, dict):
        raise Damaged(f"holds a {type(payload).__name__}, not a stage's record")
    if "sha256" not in payload:
        raise Outdated("has no checksum")
    if payload["sha256"] != content_sha256(payload):
        raise Damaged("does not match its checksum")
    if payload.get("key") != key:
        raise Damaged("holds another stage's key")
    return payload


def _seconds(record) -> float:
    """The time a stage took, from its record (a dict with "seconds"), else Damaged."""
    seconds = record.get("seconds") if isinstance(record, dict) else None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise Damaged("has no time in seconds")
    return float(seconds)


@dataclass(frozen=True)
class Keyed:
    """A stage input: the value and a key that names how it was made (a data slice's checksum, a stage's key)."""

    value: Any
    key: str


# ----------------------------------------------------------------------------- the code a stage can run


class CodeIndex:
    """Digests of the source a function can run, within the project's own files.

    Each top-level definition (function, class, constant) of a project file is hashed as its syntax tree
    without docstrings (comments and layout never reach the tree), and the digest of a function covers the
    definitions it names, transitively: names in its own file, names it imports from project modules and
    `module.name` attributes of imported project modules. A class counts whole, with every method. Code
    outside the project (torch, numpy) is covered by the environment part of the key instead."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._modules: dict[Path, _Module] = {}
        self._digests: dict[tuple[Path, str], str] = {}

    def digest(self, function: Callable, *more) -> str:
        """One digest of the code that `function` and `more` (functions, or classes defined beside `function`,
        such as its settings' class) can run."""
        home = Path(function.__code__.co_filename).resolve()
        return digest(*[self._closure_digest(*self._where(item, home)) for item in (function, *more)])

    def definitions(self, function: Callable) -> list[str]:
        """The project definitions `function` can run, as 'file:name' (for reading and for tests)."""
        home = Path(function.__code__.co_filename).resolve()
        return sorted(f"{path.relative_to(self.root)}:{name}" for path, name in self._closure(home, function.__name__))

    def _where(self, item, home: Path) -> tuple[Path, str]:
        """The file and top-level name of a function, or of a class (looked for in `home`, else its module's file:
        a module run by runpy is not in sys.modules, and a dataclass's own methods are generated code)."""
        name = item.__qualname__.split(".")[0]
        if hasattr(item, "__code__"):
            return Path(item.__code__.co_filename).resolve(), name
        if name in self._module(home).nodes:
            return home, name
        return Path(sys.modules[item.__module__].__file__).resolve(), name

    def _closure_digest(self, path: Path, name: str) -> str:
        if (path, name) not in self._digests:
            self._digests[(path, name)] = digest(*[(str(p.relative_to(self.root)), n, self._module(p).dump(n))
                                                   for p, n in sorted(self._closure(path, name))])
        return self._digests[(path, name)]

    def _closure(self, path: Path, name: str) -> set[tuple[Path, str]]:
        seen, todo = set(), [(path, name)]
        while todo:
            item = self._resolve(*todo.pop())
            if item is None or item in seen:
                continue
            seen.add(item)
            todo += list(self._module(item[0]).references(item[1]))
        return seen

    def _resolve(self, path: Path, name: str) -> tuple[Path, str] | None:
        """Follow imports until the file that defines `name` (None: not a project definition)."""
        for _ in range(16):
            module = self._module(path)
            if name in module.nodes:
                return path, name
            if name not in module.imported:
                return None
            path, name = module.imported[name]
        return None

    def _module(self, path: Path) -> "_Module":
        if path not in self._modules:
            self._modules[path] = _Module(path, self.root)
        return self._modules[path]


class _Module:
    """One project file: its top-level definitions (as docstring-free tree dumps), the project definitions each
    one refers to, and the names it imports from other project files."""

    def __init__(self, path: Path, root: Path) -> None:
        self.path = path
        tree = ast.parse(path.read_text(), filename=str(path)) if path.is_file() else ast.Module(body=[])
        self.imported: dict[str, tuple[Path, str]] = {}  # name -> (project file, its name there)
        self.modules: dict[str, Path] = {}  # alias -> project file of an imported module
        for node in tree.body:
            self._read_import(node, root)
        self.nodes = {name: node for node in tree.body for name in _defined_names(node)}
        self._dumps: dict[str, str] = {}
        self._references: dict[str, set[tuple[Path, str]]] = {}

    def dump(self, name: str) -> str:
        """The definition's syntax tree without docstrings, as text (computed when first asked for)."""
        if name not in self._dumps:
            node = self.nodes[name]
            _strip_docstrings(node)
            self._dumps[name] = ast.dump(node)
        return self._dumps[name]

    def references(self, name: str) -> set[tuple[Path, str]]:
        """The project definitions that definition `name` refers to."""
        if name not in self._references:
            self._references[name] = self._find_references(self.nodes[name])
        return self._references[name]

    def _read_import(self, node: ast.AST, root: Path) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _module_file(root, alias.name)
                if target is not None:
                    self.modules[alias.asname or alias.name.split(".")[0]] = target
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = self.path.parents[node.level - 1]
                base = ".".join([*package.relative_to(root).parts, *([base] if base else [])])
            for alias in node.names:
                module = _module_file(root, f"{base}.{alias.name}" if base else alias.name)
                if module is not None:  # `from package import module`
                    self.modules[alias.asname or alias.name] = module
                elif (source := _module_file(root, base)) is not None:
                    self.imported[alias.asname or alias.name] = (source, alias.name)

    def _find_references(self, node: ast.AST) -> set[tuple[Path, str]]:
        found = set()
        for sub in _code_nodes(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and (sub.id in self.nodes or
                                                                               sub.id in self.imported):
                found.add((self.path, sub.id))  # `_resolve` follows an imported name to its file
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in self.modules:
                found.add((self.modules[sub.value.id], sub.attr))
        return found


def _code_nodes(node: ast.AST):
    """Every node under `node` except type annotations, which run nothing (`cfg: Config` must not make a
    stage depend on every default of Config)."""
    todo = [node]
    while todo:
        current = todo.pop()
        yield current
        for name, value in ast.iter_fields(current):
            if name in ("annotation", "returns") or (isinstance(current, ast.AnnAssign) and name == "target"):
                continue
            if isinstance(value, ast.AST):
                todo.append(value)
            elif isinstance(value, list):
                todo += [item for item in value if isinstance(item, ast.AST)]


def _module_file(root: Path, dotted: str) -> Path | None:
    if not dotted:
        return None
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _defined_names(node: ast.AST) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _strip_docstrings(tree: ast.AST) -> None:
    """Remove, in place, the docstring of every function and class in `tree`."""
    for sub in ast.walk(tree):
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and sub.body:
            first = sub.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                sub.body = sub.body[1:] or [ast.Pass()]



# ----------------------------------------------------------------------------- the store


DISPLAY = "progress"  # a keyword a stage may take to show its own progress bar: not an input, not in the key


def stage_inputs(stage: Callable) -> list[str]:
    """The names of a stage's inputs: its keyword-only parameters (the first positional one is its settings)."""
    return [p.name for p in inspect.signature(stage).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != DISPLAY]


def _display(stage: Callable, progress: bool) -> dict:
    return {DISPLAY: progress} if DISPLAY in inspect.signature(stage).parameters else {}


class Store:
    """Finished stages under `root`, loaded when their key matches, else computed now and saved atomically.

    `run` serves a stage that returns a JSON-able result, `trained` one that trains a model in place (its
    state_dict and history go to <subject>/model.pt). `loaded`, `computed`, `timings` and `warnings` say what
    happened, for metrics.json; `fresh` recomputes everything once: it loads only files written in this run
    (by this store, or by another process's and handed to `accept`); `progress` shows a bar over `total`
    stages on a terminal."""

    def __init__(self, root: Path, *, code: CodeIndex, environment: dict, fresh: bool = False, total: int = 0,
                 progress: bool = False) -> None:
        self.root, self.code, self.environment, self.fresh = Path(root), code, environment, fresh
        self.loaded: list[str] = []
        self.computed: list[str] = []
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []
        self.outdated: list[Path] = []  # files without a checksum (an older version's), recomputed
        self.used: set[Path] = set()
        self.written: set[Path] = set()  # by this run: loadable even when fresh
        self.progress = progress
        self.bar = tqdm(total=total, desc="measuring", unit="stage", disable=not progress, leave=False)
        self.removed_temporaries = remove_stale_temporaries(self.root)  # what killed runs left half-written

    def key(self, stage: Callable, settings, inputs: dict[str, Keyed], *also: Callable) -> str:
        """Stage name, every settings field, every input's key, the code it can run, the environment."""
        fields = dataclasses.asdict(settings) if settings is not None else {}
        code = self.code.digest(stage, *also, *([type(settings)] if settings is not None else []))
        return digest(stage.__name__, fields, {name: value.key for name, value in sorted(inputs.items())}, code,
                      self.environment)

    def accept(self, paths) -> None:
        """Files another process of this run wrote: loadable even when fresh."""
        self.written.update(Path(p) for p in paths)

    def _stage_file(self, stage: Callable, settings, subject: str, inputs: dict[str, Keyed]
                    ) -> tuple[dict[str, Keyed], str, Path]:
        inputs = {name: inputs[name] for name in stage_inputs(stage)}
        key = self.key(stage, settings, inputs)
        return inputs, key, self.root / subject / f"{stage.__name__}.{key}.json"

    def load(self, stage: Callable, settings, subject: str, inputs: dict[str, Keyed], *, label: str
             ) -> Keyed | None:
        """The stage's saved result if it finished before (recorded as loaded), else None."""
        _, key, path = self._stage_file(stage, settings, subject, inputs)
        found = self._load_json(path, key)
        if found is None:
            return None
        self._progress(label)
        self._record(label, path, found["seconds"], loaded=True)
        return Keyed(found["result"], key)

    def run(self, stage: Callable, settings, subject: str, inputs: dict[str, Keyed], *, label: str,
            save: bool = True, reuse: bool = True) -> Keyed:
        """stage(settings, **inputs) from `subject`'s folder if it finished before, else computed and saved;
        reuse=False computes without looking (the caller has looked), save=False without loading or saving
        (a process that helps another one compute the stage)."""
        if save and reuse and (found := self.load(stage, settings, subject, inputs, label=label)) is not None:
            return found
        inputs, key, path = self._stage_file(stage, settings, subject, inputs)
        self._progress(label)
        start = time.perf_counter()
        result = stage(settings, **{name: value.value for name, value in inputs.items()}, **_display(stage, self.progress))
        seconds = round(time.perf_counter() - start, 4)
        if not save:
            self.timings[label] = seconds
            return Keyed(result, key)
        payload = {"stage": stage.__name__, "label": label, "key": key, "seconds": seconds,
                   "settings": dataclasses.asdict(settings) if settings is not None else {},
                   "inputs": {name: value.key for name, value in inputs.items()}, "result": result}
        payload["sha256"] = content_sha256(payload)
        make_folder(path.parent)
        write_bytes_atomic(path, json.dumps(payload).encode())
        self._record(label, path, seconds, loaded=False)
        return Keyed(result, key)

    def trained(self, build: Callable, fit: Callable, settings, inputs: dict[str, Keyed], *,
                label: str) -> tuple[Keyed, dict]:
        """(the model, its training history): build(settings) trained by fit(settings, model, **inputs), or the
        weights and history saved in <key>/model.pt by an earlier run with the same key."""
        inputs = {name: inputs[name] for name in stage_inputs(fit)}
        key = self.key(fit, settings, inputs, build)
        path = self.root / key / "model.pt"
        model = build(settings)
        self._progress(label)
        history = self._load_model(path, key, model)
        if history is not None:
            self._record(label, path, history["seconds"], loaded=True)
            return Keyed(model.eval(), key), history
        history = fit(settings, model, **{name: value.value for name, value in inputs.items()},
                      **_display(fit, self.progress))
        payload = {"key": key, "stage": fit.__name__, "label": label, "settings": dataclasses.asdict(settings),
                   "state_dict": model.state_dict(), "history": history}
        payload["sha256"] = content_sha256(payload)
        buffer = io.BytesIO()  # torch.save on a full disk fails with an opaque RuntimeError: it never sees the disk
        torch.save(payload, buffer)
        make_folder(path.parent)
        write_bytes_atomic(path, buffer.getbuffer())
        self._record(label, path, history["seconds"], loaded=False)
        return Keyed(model.eval(), key), history

    def _progress(self, label: str) -> None:
        self.bar.set_postfix_str(label)
        self.bar.update(1)

    def _record(self, label: str, path: Path, seconds: float, *, loaded: bool) -> None:
        self.used.add(path)
        self.timings[label] = seconds
        (self.loaded if loaded else self.computed).append(label)
        if not loaded:
            self.written.add(path)
        log.debug("%s %s: %s", "loaded" if loaded else "computed", label, path)

    def _reject(self, path: Path, err: Exception) -> None:
        if isinstance(err, Outdated):
            self.outdated.append(path)
            log.debug("%s %s: recomputing it", path, err)
        else:  # the run prints its warnings when it ends
            self.warnings.append(f"{path} is damaged ({err}); recomputing it")

    def _loadable(self, path: Path) -> bool:
        return path.exists() and (not self.fresh or path in self.written)

    def _load_json(self, path: Path, key: str) -> dict | None:
        if not self._loadable(path):
            return None
        try:
            payload = _checked(json.loads(path.read_bytes()), key)
            if "result" not in payload:
                raise Damaged("holds no result")
            return {"result": payload["result"], "seconds": _seconds(payload)}
        except (Damaged, Outdated) as err:
            self._reject(path, err)
        except (OSError, ValueError, RecursionError) as err:  # unreadable, or not JSON (UnicodeError is a ValueError)
            self._reject(path, Damaged(f"cannot be read: {type(err).__name__}"))
        return None

    def _load_model(self, path: Path, key: str, model: torch.nn.Module) -> dict | None:
        if not self._loadable(path):
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)  # copied to the model's device
            _checked(payload, key)
            _seconds(payload.get("history"))
            _check_weights(payload.get("state_dict"), model.state_dict())
            model.load_state_dict(payload["state_dict"], strict=True)
            return payload["history"]
        except (Damaged, Outdated) as err:
            self._reject(path, err)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError, EOFError,
                pickle.UnpicklingError) as err:
            self._reject(path, Damaged(f"cannot be read: {type(err).__name__}"))
        return None

    def close(self) -> None:
        self.bar.close()

    def unused(self) -> list[Path]:
        """Every file under the store's folder that this run neither loaded nor wrote."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.rglob("*") if p.is_file() and p not in self.used)

    def prune(self) -> list[Path]:
        """Delete `unused()` files and the folders they leave empty; returns what was deleted."""
        removed = self.unused()
        for path in removed:
            path.unlink()
        for folder in sorted((p for p in self.root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
        return removed


def _check_weights(saved, expected: dict[str, torch.Tensor]) -> None:
    """Damaged unless `saved` holds a tensor for each of the built model's, of its shape and dtype, and no other
    (load_state_dict checks names and shapes but quietly converts dtypes)."""
    if not isinstance(saved, dict) or set(saved) != set(expected):
        raise Damaged("holds another architecture (other parameter names)")
    for name, tensor in expected.items():
        found = saved[name]
        if not isinstance(found, torch.Tensor) or found.shape != tensor.shape or found.dtype != tensor.dtype:
            raise Damaged(f"holds another architecture ({name}: {_describe(found)}, the model has {_describe(tensor)})")


def _describe(value) -> str:
    return f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
