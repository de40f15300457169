"""Summarization prompts for drafter training, built from the ACLSum package's train and val splits.

The ACLSum *test* split is the evaluation set of the shipped drafter, so training never
reads it. Besides each paper's abstract, its conclusion and its introduction (cut into
chunks of a few sentences) are documents too: the same scientific register as the
evaluation abstracts, several times more prompts, and no test text.

Run as a module to write a prompts Parquet file (job prompt schema, template ``summarize``):

    python -m dflash_batch.jobs._train_prompts --out prompts.parquet --splits train,val --limit 400
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterator, Sequence

import click
import pyarrow as pa
import pyarrow.parquet as pq

from dflash_batch.jobs._datasets import SPLITS, _detokenize
from dflash_batch.schemas import PROMPTS_SCHEMA

SECTIONS = ("abstract", "conclusion", "introduction")


def _papers(split: str) -> list[dict]:
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("ACLSum data is missing: pip install --no-deps aclsum==0.1.2")
    root = Path(list(spec.submodule_search_locations)[0]) / "dataset"
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def _chunks(sentences: Sequence[str], max_words: int) -> Iterator[str]:
    """Consecutive sentences joined into chunks of at most ``max_words`` words (a longer
    single sentence is its own chunk)."""
    buf: list[str] = []
    words = 0
    for s in sentences:
        n = len(s.split())
        if buf and words + n > max_words:
            yield " ".join(buf)
            buf, words = [], 0
        buf.append(s)
        words += n
    if buf:
        yield " ".join(buf)


def aclsum_documents(splits: Sequence[str] = ("train", "val"), sections: Sequence[str] = SECTIONS,
                     max_words: int = 180, min_words: int = 40) -> list[dict[str, str]]:
    """Rows ``{id, document}``: abstracts first, then conclusions, then introduction chunks.

    The order is a priority: ``--limit`` keeps the abstracts (closest to the evaluation
    prompts) before the other sections.
    """
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown ACLSum split {s!r}; choose from {SPLITS}")
    for sec in sections:
        if sec not in SECTIONS:
            raise ValueError(f"unknown section {sec!r}; choose from {SECTIONS}")
    rows: list[dict[str, str]] = []
    for sec in sections:
        for split in splits:
            for paper in _papers(split):
                sentences = [_detokenize(x) for x in paper["sentences"].get(sec, [])]
                for i, doc in enumerate(_chunks(sentences, max_words)):
                    if len(doc.split()) >= min_words or sec == "abstract":
                        rows.append({"id": f"aclsum-{split}-{paper['id']}-{sec}-{i}", "document": doc})
    return rows


@click.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Prompts Parquet file to write.")
@click.option("--splits", default="train,val", show_default=True, help="ACLSum splits (comma-separated).")
@click.option("--sections", default=",".join(SECTIONS), show_default=True, help="Paper sections used as documents.")
@click.option("--limit", default=0, show_default=True, type=click.IntRange(0), help="Keep the first N rows (0: all).")
def main(out: Path, splits: str, sections: str, limit: int) -> None:
    """Write ACLSum summarization prompts (job prompt schema, template summarize)."""
    rows = aclsum_documents(tuple(s for s in splits.split(",") if s), tuple(s for s in sections.split(",") if s))
    if limit:
        rows = rows[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA), out)
    click.echo(f"{len(rows)} prompts -> {out}")


if __name__ == "__main__":
    main()
