"""Summarization prompts for drafter training, built from what the ACLSum package ships for its
train and val papers.

The ACLSum *test* split is the evaluation set of the shipped drafter, so training never reads
it: its splits are refused by name, its papers by id, and any training window that shares a
passage of ``SHINGLE`` words with a test paper is dropped (a paper quoting a test paper would
leak evaluation text; the rule also drops a few windows that share only a stock phrase).

Two prompt sets:
  * ``aclsum_documents``: each paper's abstract, conclusion and introduction (in chunks of a
    few sentences) under the job's own summarize instruction: the set of the first
    shipped drafter (935 prompts; it was trained on 938: the three dropped since share only a stock
    phrase with a test paper, "to the best of our knowledge this is the first work that").
  * ``aclsum_training_prompts``: the larger set. Every section the package carries for a
    paper (its abstract, and the full text's sections: introduction, method, experiments,
    related work, conclusion, ...), as overlapping windows of a few sentences, each asked
    with several summarization instructions. Rows carry ``messages`` (template ``none``), so
    each row keeps its own instruction.

Run as a module to write a prompts Parquet file (job prompt schema):

    python tools/train_prompts.py --out prompts.parquet --set full
    python tools/train_prompts.py --out test-prompts.parquet --set eval
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dflash_batch.jobs._datasets import SPLITS, _detokenize, aclsum_abstracts
from dflash_batch.decoder import SUMMARIZE_INSTRUCTION, summarize_messages
from dflash_batch.schemas import PROMPTS_SCHEMA

SECTIONS = ("abstract", "conclusion", "introduction")
TRAIN_SPLITS = ("train", "val")
HELD_OUT_SPLIT = "test"
SHINGLE = 12  # words: a shared passage this long is a quotation, not a common phrase

# The job's own instruction first: it is the one the evaluation prompts use.
INSTRUCTIONS = (
    SUMMARIZE_INSTRUCTION,
    "Summarize the following text in one sentence.",
    "Summarize the following text in two sentences.",
    "What are the key contributions described in the following text? Answer briefly.",
    "Write a plain-language summary of the following text for a reader outside the field.",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[])")
_WORD = re.compile(r"[a-z0-9]+")


def _root() -> Path:
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("ACLSum data is missing: pip install --no-deps aclsum==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset"


def _papers(split: str) -> list[dict]:
    return [json.loads(line) for line in (_root() / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def _check_splits(splits: Sequence[str]) -> None:
    for s in splits:
        if s == HELD_OUT_SPLIT:
            raise ValueError(f"the ACLSum {HELD_OUT_SPLIT!r} split is the evaluation set: it never enters training")
        if s not in SPLITS:
            raise ValueError(f"unknown ACLSum split {s!r}; choose from {TRAIN_SPLITS}")


def _full_text(paper_id: str) -> list[tuple[str, list[str]]]:
    """(section heading, paragraphs) of a paper's full text, in reading order; table rows and
    untitled fragments are left out."""
    path = _root() / "paper_jsons" / f"{paper_id}.json"
    if not path.exists():
        return []
    body = json.loads(path.read_text())["pdf_parse"]["body_text"]
    out: list[tuple[str, list[str]]] = []
    for para in body:
        sec, text = (para.get("section") or "").strip(), " ".join(para["text"].split())
        if not sec or "|" in sec or not text:
            continue
        if out and out[-1][0] == sec:
            out[-1][1].append(text)
        else:
            out.append((sec, [text]))
    return out


def _shingles(text: str) -> set[int]:
    """Hashes of every ``SHINGLE``-word run of ``text`` (lowercased alphanumeric words)."""
    w = _WORD.findall(text.lower())
    return {hash(" ".join(w[i : i + SHINGLE])) for i in range(len(w) - SHINGLE + 1)}


def held_out_shingles() -> set[int]:
    """The passages of every text the package ships for the test papers (sections and full text)."""
    out: set[int] = set()
    for paper in _papers(HELD_OUT_SPLIT):
        for sentences in paper["sentences"].values():
            out |= _shingles(" ".join(sentences))
            out |= _shingles(" ".join(_detokenize(s) for s in sentences))
        for _, paras in _full_text(paper["id"]):
            out |= _shingles(" ".join(paras))
    return out


def _is_prose(text: str) -> bool:
    """False for extraction debris (LaTeX source spelled out letter by letter, number tables)."""
    words = text.split()
    return bool(words) and sum(len(w) > 1 and any(c.isalpha() for c in w) for w in words) >= 0.7 * len(words)


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


def _windows(sentences: Sequence[str], max_words: int, stride_words: int) -> Iterator[str]:
    """Windows of whole sentences, at most ``max_words`` words each (a longer sentence alone),
    starting every ``stride_words`` words or so: with a stride below ``max_words`` they overlap,
    so one passage is seen with different context around it."""
    lens = [len(s.split()) for s in sentences]
    start, last_end = 0, 0
    while start < len(sentences) and last_end < len(sentences):
        end, words = start, 0
        while end < len(sentences) and (end == start or words + lens[end] <= max_words):
            words += lens[end]
            end += 1
        yield " ".join(sentences[start:end])
        last_end = end
        step, nxt = 0, start
        while nxt < end - 1 and step < stride_words:
            step += lens[nxt]
            nxt += 1
        start = max(nxt, start + 1)


def aclsum_documents(splits: Sequence[str] = TRAIN_SPLITS, sections: Sequence[str] = SECTIONS,
                     max_words: int = 180, min_words: int = 40) -> list[dict[str, str]]:
    """Rows ``{id, document}``: abstracts first, then conclusions, then introduction chunks
(chunks sharing a passage with a test paper dropped).

    The order is a priority: ``--limit`` keeps the abstracts (closest to the evaluation
    prompts) before the other sections.
    """
    _check_splits(splits)
    for sec in sections:
        if sec not in SECTIONS:
            raise ValueError(f"unknown section {sec!r}; choose from {SECTIONS}")
    leak = held_out_shingles()
    rows: list[dict[str, str]] = []
    for sec in sections:
        for split in splits:
            for paper in _papers(split):
                sentences = [_detokenize(x) for x in paper["sentences"].get(sec, [])]
                for i, doc in enumerate(_chunks(sentences, max_words)):
                    if (len(doc.split()) >= min_words or sec == "abstract") and not _shingles(doc) & leak:
                        rows.append({"id": f"aclsum-{split}-{paper['id']}-{sec}-{i}", "document": doc})
    return rows


def _paper_documents(split: str, paper: dict, max_words: int, stride_words: int, min_words: int
                     ) -> Iterator[tuple[str, str]]:
    """(id, document) for one paper: its whole abstract, then windows over each full-text
    section (the package's own introduction and conclusion sentences where it has no full text)."""
    pid = paper["id"]
    yield f"aclsum-{split}-{pid}-abstract", " ".join(_detokenize(s) for s in paper["sentences"]["abstract"])
    sections = [(sec, [s for p in paras for s in _SENTENCE_END.split(p)]) for sec, paras in _full_text(pid)]
    if not sections:
        sections = [(sec, [_detokenize(s) for s in paper["sentences"].get(sec, [])])
                    for sec in ("introduction", "conclusion")]
    for si, (_, sentences) in enumerate(sections):
        for wi, doc in enumerate(_windows(sentences, max_words, stride_words)):
            if len(doc.split()) >= min_words and _is_prose(doc):
                yield f"aclsum-{split}-{pid}-s{si}-w{wi}", doc


def aclsum_training_prompts(splits: Sequence[str] = TRAIN_SPLITS, instructions: Sequence[str] = INSTRUCTIONS,
                            max_words: int = 180, stride_words: int = 90, min_words: int = 40,
                            seed: int = 0) -> list[dict]:
    """Rows ``{id, messages}``: every document of ``_paper_documents`` under every instruction.

    Order: the abstracts under the job's own instruction first (closest to the evaluation
    prompts), then every other row in a seeded shuffle, so any prefix (``--limit``) is a
    fair sample of sections and instructions. Windows sharing a passage with a test paper
    are dropped.
    """
    _check_splits(splits)
    if not instructions:
        raise ValueError("at least one instruction is needed")
    leak = held_out_shingles()
    first: list[dict] = []
    rest: list[dict] = []
    for split in splits:
        for paper in _papers(split):
            for doc_id, doc in _paper_documents(split, paper, max_words, stride_words, min_words):
                if _shingles(doc) & leak:
                    continue
                for k, instruction in enumerate(instructions):
                    row = {"id": f"{doc_id}-i{k}", "messages": summarize_messages(doc, instruction)}
                    (first if k == 0 and doc_id.endswith("-abstract") else rest).append(row)
    order = np.random.default_rng(seed).permutation(len(rest))
    return first + [rest[i] for i in order]


def evaluation_prompts() -> list[dict]:
    """Rows ``{id, messages}`` of the ACLSum test abstracts: the prompts a ``summarize`` job
    renders for them (``make-example-input --split test``), as messages, so that training
    hosts without the pipeline's dependencies evaluate on exactly the job's prompts."""
    return [{"id": r["id"], "messages": summarize_messages(r["document"])} for r in aclsum_abstracts(HELD_OUT_SPLIT)]


def prompt_documents(rows: Iterable[dict]) -> Iterator[str]:
    """The document text of prompt rows of either set (what a leak check reads)."""
    for r in rows:
        if r.get("document") is not None:
            yield r["document"]
        else:
            yield r["messages"][-1]["content"].split("\n\n", 1)[-1]


@click.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Prompts Parquet file to write.")
@click.option("--set", "which", default="sections", show_default=True,
              type=click.Choice(["sections", "full", "eval"]),
              help="sections: abstracts, conclusions and introductions under the job's instruction (935 prompts); "
              "full: every section, overlapping windows, several instructions; eval: the ACLSum test abstracts "
              "under the job's instruction, for evaluation only.")
@click.option("--splits", default=",".join(TRAIN_SPLITS), show_default=True, help="ACLSum splits (comma-separated).")
@click.option("--sections", default=",".join(SECTIONS), show_default=True, help="Sections (set 'sections' only).")
@click.option("--instructions", default=len(INSTRUCTIONS), show_default=True,
              type=click.IntRange(1, len(INSTRUCTIONS)), help="How many instructions (set 'full' only).")
@click.option("--limit", default=0, show_default=True, type=click.IntRange(0), help="Keep the first N rows (0: all).")
def main(out: Path, which: str, splits: str, sections: str, instructions: int, limit: int) -> None:
    """Write ACLSum summarization prompts (job prompt schema)."""
    split_list = tuple(s for s in splits.split(",") if s)
    try:
        if which == "sections":
            rows = aclsum_documents(split_list, tuple(s for s in sections.split(",") if s))
        elif which == "eval":
            rows = evaluation_prompts()
        else:
            rows = aclsum_training_prompts(split_list, INSTRUCTIONS[:instructions])
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if limit:
        rows = rows[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    # Only the columns the rows fill: a ``document`` column makes a reader pick the summarize template.
    schema = pa.schema([f for f in PROMPTS_SCHEMA if any(f.name in r for r in rows[:1])],
                       metadata=PROMPTS_SCHEMA.metadata)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out, compression="zstd", compression_level=19)
    click.echo(f"{len(rows)} prompts -> {out}")


if __name__ == "__main__":
    main()
