"""Example inputs that ship with the registries: ACLSum paper abstracts.

The ``aclsum`` PyPI package (installed with ``--no-deps``) carries the data set as
JSONL; only the files are read, so its own dependencies are not needed.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

SPLITS = ("train", "val", "test")

# The corpus stores sentences tokenized with spaces around punctuation.
_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{]) ")


def _detokenize(sentence: str) -> str:
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", sentence))


def aclsum_abstracts(split: str = "test") -> list[dict[str, str]]:
    """Rows ``{id, title, document}`` with each paper's abstract, in file order."""
    if split not in SPLITS:
        raise ValueError(f"unknown ACLSum {split=}; choose one of {SPLITS}")
    # find_spec locates the package without importing it (its __init__ needs extra packages).
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("ACLSum data is missing: pip install --no-deps aclsum==0.1.2")
    root = Path(list(spec.submodule_search_locations)[0]) / "dataset"
    rows = []
    for line in (root / f"{split}.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        paper = json.loads(line)
        abstract = " ".join(_detokenize(s) for s in paper["sentences"]["abstract"])
        rows.append({"id": f"aclsum-{split}-{paper['id']}", "title": paper.get("title", ""), "document": abstract})
    return rows
