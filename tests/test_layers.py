"""The package layout states the layers, and imports follow them (docs/design.md, "Layers"):
core <- library (data, nets, diffusion, particles, evaluate, train) <- phases <- cli; the tools
may use everything but the CLI, and nothing but the CLI imports the tools."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LDM = Path(__file__).resolve().parents[1] / "ldm"
LIBRARY = {"data", "nets", "diffusion", "particles", "evaluate", "train"}
ALLOWED = {  # package -> the ldm packages its modules may import
    "core": {"core"},
    **{lib: {"core"} | LIBRARY for lib in LIBRARY},
    "phases": {"core", "phases"} | LIBRARY,
    "tools": {"core", "phases", "tools"} | LIBRARY,
    "cli": {"core", "phases", "tools", "cli"} | LIBRARY,
}


def layer_violations(root: Path = LDM) -> list[str]:
    """'module imports target' for every import of an ldm package the importer's layer may not
    use (imports inside functions included)."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if len(rel.parts) == 1:  # ldm/__init__.py, ldm/__main__.py (python -m ldm -> the CLI)
            continue
        layer = rel.parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "ldm" and len(parts) > 1 and parts[1] not in ALLOWED[layer]:
                    bad.append(f"{rel} imports {name}")
    return bad


def test_every_module_lives_in_a_layer_folder():
    flat = sorted(p.name for p in LDM.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert flat == []
    assert {p.name for p in LDM.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ALLOWED)


def test_imports_follow_the_layers():
    assert layer_violations() == []


def test_a_forbidden_import_is_caught(tmp_path):
    forbidden = {"core": "from ldm.data import io\n", "nets": "import ldm.tools.benchmark\n",
                 "phases": "from ldm.cli.app import main\n"}
    for layer, code in forbidden.items():
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "m.py").write_text(code)
    assert len(layer_violations(tmp_path)) == 3
    with pytest.raises(KeyError):  # a folder outside the layer map is not silently allowed
        (tmp_path / "misc").mkdir()
        (tmp_path / "misc" / "m.py").write_text("import ldm.core\n")
        layer_violations(tmp_path)
