"""Shared helpers of the pipeline and job tests: a tiny chat model, prompt files, reading outputs.

Every job in the tests uses the same decoder shape (``DECODE``), so each process compiles the
tiny model once and every later job reuses it (see ``pipeline/_model.py``).
"""

from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Both buckets round up to one 64-token prefill chunk: one compiled program serves both.
DECODE = {"batch_size": 2, "max_new_tokens": 8, "prompt_buckets": [16, 64]}
# Columns that legitimately differ between two runs of the same job.
VOLATILE = ("worker", "decode_seconds", "batch_index")


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a tokenizer and chat template, built once per session (shared by folders)."""
    from tiny_chat_model import make_tiny_chat_checkpoint

    folder = tmp_path_factory.getbasetemp() / "tiny-chat-model"
    if not (folder / "config.json").is_file():
        make_tiny_chat_checkpoint(folder)
    return folder


def job_spec(model: Path | str, input: str | Path, output: str | Path, **settings: Any):
    """A validated job spec (``jobs.JobSpec``) for a tiny-model job, template none unless given.

    ``settings`` are spec keys by their own name, each put in the section that has it
    (``mode="ngram"``, ``rows_per_batch=4``, ``direct_num_workers=2``; ``name`` is the job's).
    """
    from dflash_batch.jobs._spec import _SECTION_TYPES, validate

    raw: dict[str, Any] = {"name": settings.pop("name", "job"), "input": str(input), "output": str(output),
                           "model": {"target": str(model)}, "decode": dict(DECODE), "prompt": {"template": "none"}}
    for key, value in settings.items():
        [section] = [s for s, cls in _SECTION_TYPES.items() if key in {f.name for f in dataclasses.fields(cls)}]
        raw.setdefault(section, {})[key] = str(value) if isinstance(value, Path) else value
    return validate(raw)


def write_prompts(path: Path, rows: list[dict[str, Any]] | pa.Table, schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)
    return path


def sentence(i: int) -> str:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "summarize", "papers", "results"]
    return " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(3 + i % 9)).capitalize() + "."


def read_rows(pattern: str) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(glob.glob(pattern)):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def completions(output: Path | str) -> list[dict[str, Any]]:
    return read_rows(f"{output}/completions-*.parquet")


def dead_letters(output: Path | str) -> list[dict[str, Any]]:
    return read_rows(f"{output}/dead_letters-*.parquet")


def job_stats(output: Path | str) -> dict[str, Any]:
    return json.loads((Path(output) / "job_stats.json").read_text())


def stable(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows by id without the columns that differ between runs."""
    return {r["id"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}

