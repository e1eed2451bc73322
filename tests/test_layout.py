"""The package's layout: no import cycles, files readable in one sitting, every public name where
the README says it is."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"mla_pass": ROOT / "mla_pass", "mla_pass.export": ROOT / "export", "mla_pass.runtime": ROOT / "runtime"}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of ours that ``name`` imports, at any depth (function-level imports count: they
    run too). Edges into a package's ``__init__`` count only when something is imported from it."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = "done"
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # a package face that re-exports its own modules is not a cycle: only module → module edges
    faces = {n for n, p in modules.items() if p.name == "__init__.py"}
    graph = {n: {t for t in ts if t not in faces} for n, ts in graph.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_cycle_detector_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_too_long():
    long = {n: sum(1 for _ in p.open()) for n, p in _modules().items()}
    long = {n: lines for n, lines in long.items() if lines > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_module_says_what_it_does():
    missing = [n for n, p in _modules().items() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


@pytest.mark.parametrize("name", ["convert", "MLAConfig", "MLAModel", "load", "recover", "RecoveryConfig", "distill",
                                  "DistillConfig", "CheckpointError", "UnsupportedAttentionError", "NoAttentionError",
                                  "inspect_model", "kv_cache_bytes_per_token"])
def test_public_names(name):
    import mla_pass
    assert getattr(mla_pass, name) is not None


def test_export_and_runtime_names():
    import mla_pass.export
    import mla_pass.export.onnx
    import mla_pass.runtime
    from mla_pass.quality import calibration_windows, held_out_windows, text_quality  # noqa: F401
    assert mla_pass.export.to_onnx is mla_pass.export.onnx.to_onnx
    assert mla_pass.runtime.OnnxEngine is not None
    with pytest.raises(AttributeError, match="no attribute 'to_tensorrt'"):
        mla_pass.export.to_tensorrt  # noqa: B018


def test_runtime_imports_no_torch():
    code = "import sys, mla_pass.runtime; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_verbs():
    out = subprocess.run([sys.executable, "-m", "mla_pass.cli", "--help"], capture_output=True, text=True)
    for verb in ("inspect", "convert", "export", "generate", "eval", "recover", "demo"):
        assert verb in out.stdout, (verb, out.stdout, out.stderr)
