"""Drafter training prompts: many in-domain prompts, and never a text of the evaluation split."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from train_prompts import (
    INSTRUCTIONS, _windows, aclsum_documents, aclsum_training_prompts, prompt_documents,
)
from dflash_batch.decoder import summarize_messages

pytest.importorskip("aclsum", reason="the aclsum data package is needed") if importlib.util.find_spec(
    "aclsum") is None else None

ROOT = Path(list(importlib.util.find_spec("aclsum").submodule_search_locations)[0]) / "dataset"
RUN = 12  # words in a row that count as the same passage


def _split_ids(split: str) -> set[str]:
    return {json.loads(x)["id"] for x in (ROOT / f"{split}.jsonl").read_text().splitlines() if x.strip()}


def _passages(text: str) -> set[str]:
    w = re.findall(r"[a-z0-9]+", text.lower())
    return {" ".join(w[i : i + RUN]) for i in range(len(w) - RUN + 1)}


@pytest.fixture(scope="module")
def test_papers():
    """Every text the package ships for the test papers: their ids, and their passages."""
    ids = _split_ids("test")
    passages: set[str] = set()
    for line in (ROOT / "test.jsonl").read_text().splitlines():
        if line.strip():
            for sentences in json.loads(line)["sentences"].values():
                passages |= _passages(" ".join(sentences))
    for pid in ids:
        doc = json.loads((ROOT / "paper_jsons" / f"{pid}.json").read_text())
        passages |= _passages(" ".join(p["text"] for p in doc["pdf_parse"]["body_text"]))
        passages |= _passages(doc.get("abstract") or "")
    return ids, passages


@pytest.fixture(scope="module")
def full():
    return aclsum_training_prompts()


def _paper_id(row_id: str) -> str:
    return re.match(r"aclsum-(?:train|val)-(.+?)-(?:abstract|s\d+-w\d+|conclusion|introduction)", row_id).group(1)


@pytest.mark.parametrize("which", ["full", "sections"])
def test_no_prompt_comes_from_a_test_paper(which, full, test_papers):
    rows = full if which == "full" else aclsum_documents()
    ids, passages = test_papers
    allowed = _split_ids("train") | _split_ids("val")
    assert not allowed & ids
    for row in rows:
        assert _paper_id(row["id"]) in allowed, row["id"]
    docs = list(prompt_documents(rows))
    leaked = [d[:80] for d in docs if _passages(d) & passages]
    assert not leaked, leaked[:3]


def test_the_test_split_is_refused_by_name():
    with pytest.raises(ValueError, match="evaluation set"):
        aclsum_training_prompts(splits=("train", "test"))
    with pytest.raises(ValueError, match="evaluation set"):
        aclsum_documents(splits=("test",))


def test_full_set_asks_every_section_window_with_every_instruction(full):
    old = aclsum_documents()
    assert len(full) > 20 * len(old)  # 30k vs 938
    assert len({r["id"] for r in full}) == len(full)
    by_doc: dict[str, set[str]] = {}
    for r in full:
        doc, _, k = r["id"].rpartition("-i")
        by_doc.setdefault(doc, set()).add(r["messages"][0]["content"].split("\n\n")[0])
    assert all(v == set(INSTRUCTIONS) for v in by_doc.values())
    assert sum(d.endswith("-abstract") for d in by_doc) == 150  # every train+val paper's abstract
    assert len({re.sub(r"-w\d+$", "", d) for d in by_doc if "-w" in d}) > 10 * 150  # many sections per paper
    # The job's own instruction on the abstracts comes first; the rest is shuffled.
    assert all(r["id"].endswith("-abstract-i0") for r in full[:150])
    doc = next(prompt_documents(full[:1]))
    assert full[0]["messages"] == summarize_messages(doc)


def test_windows_overlap_cover_every_sentence_and_respect_the_length():
    sentences = [f"Sentence {i} " + "word " * (i % 7 + 3) + "end." for i in range(40)]
    wins = list(_windows(sentences, max_words=40, stride_words=20))
    assert all(len(w.split()) <= 40 for w in wins)
    covered = {s for w in wins for s in sentences if s in w}
    assert covered == set(sentences)
    assert sum(len(w.split()) for w in wins) > 1.5 * sum(len(s.split()) for s in sentences)  # they overlap
    assert list(_windows(["one very long sentence " * 20], 10, 5)) == ["one very long sentence " * 20]
