"""The rules the package's layout keeps: no import circle, every verb a `vlseg` verb (old forms still working), library
code that never looks into a checkout, shipped configs found by name from anywhere."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from vlseg.cli import VERBS
from vlseg.config import config_path, load_config

PACKAGE = Path(__file__).resolve().parents[1] / "vlseg"


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module of the package → the package's modules it imports anywhere in its text (function-local imports
    included)."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the walk really saw the package
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_walk_finds_a_circle_hidden_in_a_function(tmp_path):
    # The circle the old layout had (cli → predict → inference → calibrate → cli) ran through function-local imports.
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("from pkg.sub import predict\n")
    (pkg / "sub" / "predict.py").write_text("import os\n\n\ndef go():\n    from pkg.cli import run\n")
    (pkg / "sub" / "other.py").write_text("from pkg import cli\n")
    assert find_circle(import_graph(pkg)) == ["pkg.cli", "pkg.sub.predict", "pkg.cli"]
    (pkg / "sub" / "predict.py").write_text("import os\n")
    assert find_circle(import_graph(pkg)) is None


def test_library_code_never_computes_a_path_into_the_checkout():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "parents[" in text or "import data_prep" in text or "from data_prep" in text:
            offenders.append(str(path.relative_to(PACKAGE.parent)))
    assert offenders == []


def test_every_verb_has_a_module_with_main():
    import importlib

    from vlseg.cli import MODULES

    for verb in VERBS:
        assert callable(importlib.import_module(f"vlseg.cli.{MODULES.get(verb, verb)}").main), verb


@pytest.mark.parametrize("argv", [
    ["-m", "vlseg", "prepare", "convert", "--help"],
    ["-m", "vlseg", "import", "voxtell", "--help"],
    ["-m", "vlseg.cli", "ablate", "--help"],
    ["-m", "vlseg.ablate", "--help"],
    ["-m", "data_prep.convert", "--help"],
    ["-m", "data_prep.preprocess", "--help"],
    ["-m", "data_prep.phantoms", "--help"],
    ["-m", "data_prep.fetch_samples", "--help"],
    ["train.py", "--help"],
    ["evaluate.py", "--help"],
])
def test_old_and_new_entry_forms_run_from_any_folder(argv, tmp_path):
    repo = PACKAGE.parent
    argv = [str(repo / argv[0]), *argv[1:]] if argv[0].endswith(".py") else argv
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def test_vlseg_without_a_verb_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "vlseg"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    for verb in ("prepare", "train", "evaluate", "ablate", "demo", "predict", "calibrate", "classes"):
        assert f"  {verb} " in out.stderr


def test_shipped_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("phantom", "real.yaml", "configs/reference/sat_nano.yaml", "reference/clip_universal"):
        assert config_path(name).is_file(), name
    assert load_config("phantom")["run_name"] == "phantom"
    (tmp_path / "phantom.yaml").write_text("run_name: mine\n")  # a file of the user's wins over the shipped one
    assert load_config("phantom.yaml")["run_name"] == "mine"
