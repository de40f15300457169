"""Import direction: jobs -> pipeline -> decoder, and jobs use only their public names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(folder: str) -> list[tuple[str, str]]:
    """(file, module) for every ``import``/``from ... import`` in ``folder``'s Python files."""
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                out.append((path.name, node.module))
            elif isinstance(node, ast.Import):
                out += [(path.name, alias.name) for alias in node.names]
    return out


def test_jobs_import_only_public_names_of_the_decoder_and_pipeline():
    private = [(f, m) for f, m in _imports("jobs")
               if m.startswith(("dflash_batch.decoder._", "dflash_batch.pipeline._"))]
    assert private == []


def test_the_pipeline_never_imports_jobs():
    assert [(f, m) for f, m in _imports("pipeline") if m.startswith("dflash_batch.jobs")] == []
