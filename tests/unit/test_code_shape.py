"""Project rules that keep the code easy to change (docs/CONTRIBUTING.md): short functions, no import circle
between modules, optimizer internals only inside `optim/`, every reference followable inside the repository
(no section signs, no outside documents or their codes, no paths of one machine), and every benchmark has a
quick mode. Each text rule is also shown failing on a planted violation."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mindspeed_mm_osp"
MAX_LINES = 60
# Where source and docs live; JSON files are configs and data: only the section sign and outside documents count.
TEXT_DIRS = ("mindspeed_mm_osp", "bench", "scripts", "examples", "tests", "docs")
PROSE_SUFFIXES = {".py", ".md", ".sh", ".txt", ".toml", ".cfg"}
# Written so that this file does not match itself.
SECTION_SIGN = re.compile("\u00a7")
OUTSIDE_DOCUMENT = re.compile(r"\.\./shared|shared[/]reference")
OUTSIDE_CODE = re.compile(r"\b[RB]\d{1,2}\b")  # bug and release codes of the outside specs: a B or R and a number
# Comments and strings (f-string text is its own token from Python 3.12).
PROSE_TOKENS = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|home|root|Users|tmp)/")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that `name` imports (at any depth of its code, lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            found.update(subs if len(subs) == len(node.names) else [target, *subs])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules and m != name}


def _shown(path) -> Path:
    path = Path(path)
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _long_functions(paths) -> list[str]:
    return [f"{_shown(path)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in paths for node in ast.walk(ast.parse(Path(path).read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_LINES]


def test_no_function_over_60_lines():
    long = _long_functions(sorted(PACKAGE.rglob("*.py")))
    assert not long, f"functions over {MAX_LINES} lines: {long}"


def test_long_function_rule_catches_a_planted_one(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES - 1))
    (tmp_path / "ok.py").write_text(f"def fits():\n{body}\n")
    method_body = body.replace("\n", "\n    ")
    (tmp_path / "long.py").write_text(f"class C:\n    def too_long(self):\n    {method_body}\n        return 0\n")
    assert _long_functions([tmp_path / "ok.py"]) == []
    assert _long_functions([tmp_path / "long.py"]) == [f"{tmp_path / 'long.py'}:2 too_long ({MAX_LINES + 1} lines)"]


def _prose(path: Path, text: str) -> list[tuple[int, str]]:
    """(line, text) of what a reader reads: a Python file's comments and strings, any other file's lines."""
    if path.suffix != ".py":
        return list(enumerate(text.splitlines(), 1))
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in PROSE_TOKENS:
            out += [(tok.start[0] + k, line) for k, line in enumerate(tok.string.splitlines())]
    return out


def _outside_references(paths) -> list[str]:
    """Section signs and outside documents anywhere; outside codes and machine paths in prose files."""
    found = []
    for path in paths:
        text = path.read_text(errors="replace")
        rules = [(SECTION_SIGN, "section sign"), (OUTSIDE_DOCUMENT, "outside document")]
        lines = list(enumerate(text.splitlines(), 1))
        found += [f"{_shown(path)}:{n}: {what}" for n, line in lines for rule, what in rules if rule.search(line)]
        if path.suffix in PROSE_SUFFIXES:
            rules = [(OUTSIDE_CODE, "outside code"), (MACHINE_PATH, "machine path")]
            found += [f"{_shown(path)}:{n}: {what}" for n, line in _prose(path, text) for rule, what in rules
                      if rule.search(line)]
    return found


def _repository_text_files() -> list[Path]:
    files = [p for d in TEXT_DIRS for p in sorted((ROOT / d).rglob("*"))
             if p.is_file() and (p.suffix in PROSE_SUFFIXES or p.suffix == ".json") and "__pycache__" not in p.parts]
    return files + [ROOT / "README.md"] + sorted(ROOT.glob("*.py"))


def test_every_reference_can_be_followed_inside_the_repository():
    found = _outside_references(_repository_text_files())
    assert not found, "write the fact into docs/ in our own words and point there:\n" + "\n".join(found)


def test_reference_rules_catch_planted_violations(tmp_path):
    section, code, path = "\u00a7", "B" + "19", "/wo" + "rk/x.md"
    planted = {"a.py": f"x = 1  # spec {section}2.1\n", "b.md": f"see ../sha{'red'}/notes.md\n",
               "c.py": f'"""Fixes {code}."""\n', "d.md": f"copied from {path}\n",
               "e.json": f'{{"note": "{section}3"}}\n'}
    for name, text in planted.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "clean.py").write_text('"""Shapes as in docs/data.md; a B-spline and /usr/lib are fine."""\n'
                                       f'{code} = "n/a"  # an identifier, not prose\n')
    (tmp_path / "clean.json").write_text(f'{{"from_pretrained": "{path}", "id": "{code}"}}\n')
    found = _outside_references(sorted(tmp_path.iterdir()))
    assert [f.split(": ", 1)[1] for f in found] == ["section sign", "outside document", "outside code",
                                                     "machine path", "section sign"]
    assert [Path(f.split(":")[0]).name for f in found] == ["a.py", "b.md", "c.py", "d.md", "e.json"]


def _benches() -> list[Path]:
    return sorted((ROOT / "bench").glob("bench_*.py"))


def _help_text(bench: Path, monkeypatch) -> str:
    """`bench --help` run in this process (the benches parse their arguments before any heavy work)."""
    monkeypatch.syspath_prepend(str(bench.parent))
    monkeypatch.setattr(sys, "argv", [str(bench), "--help"])
    spec = importlib.util.spec_from_file_location(f"_code_shape_{bench.stem}", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0, f"{bench.name} --help exited {exit_info.value.code}"
    return out.getvalue()


def test_every_bench_has_a_quick_mode(monkeypatch):
    missing = [b.name for b in _benches() if "--quick" not in _help_text(b, monkeypatch)]
    assert not missing, f"benches without --quick: {missing}"


def test_quick_mode_rule_catches_a_planted_bench(tmp_path, monkeypatch):
    bench = tmp_path / "bench_planted.py"
    bench.write_text("import argparse\n\n\ndef main():\n    p = argparse.ArgumentParser()\n"
                     "    p.add_argument('--steps', type=int)\n    p.parse_args()\n")
    assert "--quick" not in _help_text(bench, monkeypatch)


@pytest.mark.slow
def test_a_quick_bench_run_exits_0():
    """One real quick run (the planner's: a tiny model on TP=1) proves the flag does more than parse."""
    result = subprocess.run([sys.executable, "bench/bench_planner.py", "--quick"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_import_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_checkpoints_use_only_the_public_optimizer_api():
    offending = [f"{path.relative_to(PACKAGE)}:{n}" for path in sorted((PACKAGE / "checkpoint").rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if "_subs" in line or ".optimizer.state" in line]
    assert not offending, offending
