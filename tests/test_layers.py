"""The layers of jaxret import downwards only (docs/design.md has the picture)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxret"

# Bottom to top: a module may import its own layer and the layers before it, never after.
LAYERS = (
    ("__init__", "errors", "configlib", "losses", "dtypes", "host_memory"),
    ("parallel",),
    ("models",),
    ("data",),
    ("lexical",),
    ("index", "teachers"),
    ("eval",),
    ("train",),
    ("methods",),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _part(module: str) -> str | None:
    """The top-level part of jaxret a dotted module name belongs to (None: not jaxret)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "jaxret" and len(parts) > 1 else None


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, jaxret part) of every import in `path` (a file under `root`, the jaxret
    folder), including those inside functions."""
    rel = path.relative_to(root.parent).with_suffix("")
    package = ".".join(rel.parts[:-1]) if rel.name != "__init__" else ".".join(rel.parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] if base != "jaxret" else [f"jaxret.{a.name}" for a in node.names]
        else:
            continue
        out += [(node.lineno, p) for p in map(_part, names) if p is not None]
    return out


def layering_violations(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        own = rel.parts[0].removesuffix(".py")
        if own not in RANK:
            problems.append(f"jaxret/{rel}: {own!r} is in no layer of tests/test_layers.py")
            continue
        for line, part in imports_of(path, root):
            if part not in RANK:
                problems.append(f"jaxret/{rel}:{line} imports jaxret.{part}, in no layer")
            elif RANK[part] > RANK[own]:
                problems.append(f"jaxret/{rel}:{line}: {own} imports the higher layer {part}")
    return problems


def test_lower_layers_never_import_higher_ones():
    """Every import in jaxret/ (function-level ones included) goes down the layer list.
    Fails if, e.g., models/dual_encoder.py imports jaxret.train.checkpoint again (it did,
    inside a function, until the best-parameters reader moved down)."""
    assert layering_violations() == []


def test_the_check_sees_an_upward_import_inside_a_function(tmp_path):
    """The checker itself: an upward import hidden in a function body is reported, an
    allowed one is not. Fails if imports_of only looks at module-level statements."""
    root = tmp_path / "jaxret"
    (root / "models").mkdir(parents=True)
    (root / "models" / "a.py").write_text(
        "import numpy\nfrom jaxret.parallel import mesh\n\n\ndef f():\n"
        "    from jaxret.train.checkpoint import x\n    return x\n"
    )
    (root / "models" / "b.py").write_text("from . import a\nfrom ..train import loop\n")
    problems = layering_violations(root)
    assert problems == [
        "jaxret/models/a.py:6: models imports the higher layer train",
        "jaxret/models/b.py:2: models imports the higher layer train",
    ]


@pytest.mark.parametrize("part", sorted(RANK))
def test_every_layer_exists(part):
    """A renamed folder cannot leave a stale layer behind (the check would pass vacuously)."""
    assert (PACKAGE / part).is_dir() or (PACKAGE / f"{part}.py").is_file()
