"""Bad input: each bad row ends as a dead letter with a clear reason, and every job accounts for
every row (rows in = completions + dead letters); bad files, paths and models are refused
before any work starts, naming what to fix."""

from __future__ import annotations

import pyarrow as pa
import pytest
from job_helpers import completions, dead_letters, job_spec, job_stats, sentence, write_prompts

from dflash_batch.pipeline import JobRefused, build

SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("messages", pa.list_(
    pa.struct([("role", pa.string()), ("content", pa.string())]))), ("max_new_tokens", pa.int32()),
    ("title", pa.string())])

ROWS = [
    ("ok-1", sentence(1)), ("ok-2", sentence(2)),
    (None, sentence(3)), ("", sentence(4)), ("   ", sentence(5)),  # missing / empty ids
    ("no-prompt", None), ("empty-prompt", ""),
    ("dup", sentence(6)), ("dup", sentence(7)),
    ("too-long", "the quick brown fox jumps over the lazy dog " * 30),
    ("control", "tab\tis fine but bell \x07 is not"),
    ("not-utf8", b"valid start \xff\xfe end"),
    ("bad-title", sentence(8)),
    ("too-many-tokens", sentence(9)),
]


def _table() -> pa.Table:
    prompts = [p.encode() if isinstance(p, str) else p for _, p in ROWS]
    titles = [b"caf\xe9" if rid == "bad-title" else b"fine" for rid, _ in ROWS]
    return pa.table({
        "id": pa.array([rid for rid, _ in ROWS], pa.string()),
        # Bytes that are not UTF-8 can sit in a Parquet string column; build them as binary.
        "prompt": pa.array(prompts, pa.binary()).view(pa.string()),
        "messages": pa.array([None] * len(ROWS), SCHEMA.field("messages").type),
        "max_new_tokens": pa.array([100 if rid == "too-many-tokens" else None for rid, _ in ROWS], pa.int32()),
        "title": pa.array(titles, pa.binary()).view(pa.string()),
    })


@pytest.fixture(scope="module")
def bad_job(chat_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_prompts(root / "in.parquet", _table())
    result = build(job_spec(chat_model_dir, root / "in.parquet", root / "out")).run()
    reasons: dict[object, list[str]] = {}
    for d in dead_letters(root / "out"):
        reasons.setdefault(d["id"], []).append(d["error"])
    return {"out": root / "out", "reasons": reasons, "result": result}


def test_rows_in_equals_completions_plus_dead_letters(bad_job):
    stats = job_stats(bad_job["out"])
    n_done, n_dead = len(completions(bad_job["out"])), len(dead_letters(bad_job["out"]))
    assert n_done + n_dead == len(ROWS) == stats["rows_in"]
    assert (stats["completions_out"], stats["dead_letters"]) == (n_done, n_dead)
    assert sorted(r["id"] for r in completions(bad_job["out"])) == ["dup", "ok-1", "ok-2"]


def test_missing_or_empty_id(bad_job):
    assert bad_job["reasons"][None] == ["missing id"]
    assert bad_job["reasons"][""] == bad_job["reasons"]["   "] == ["id is empty"]


def test_missing_or_empty_prompt(bad_job):
    assert bad_job["reasons"]["no-prompt"] == ["missing prompt or messages (template 'none' needs one)"]
    assert bad_job["reasons"]["empty-prompt"] == ["prompt is empty"]


def test_duplicate_ids_keep_one_row(bad_job):
    [reason] = bad_job["reasons"]["dup"]
    assert reason.startswith("duplicate id 'dup': 2 rows share it")
    assert [r["id"] for r in completions(bad_job["out"])].count("dup") == 1


def test_prompt_longer_than_the_model(bad_job):
    [reason] = bad_job["reasons"]["too-long"]
    assert reason.startswith("prompt is ") and "more than the model's context of 512 tokens" in reason


def test_control_characters(bad_job):
    assert bad_job["reasons"]["control"] == ["prompt contains control characters (U+0007 at offset 21)"]


def test_invalid_utf8_in_the_prompt_and_in_a_carried_column(bad_job):
    [reason] = bad_job["reasons"]["not-utf8"]
    assert reason.startswith("prompt is not valid UTF-8")
    assert bad_job["reasons"]["bad-title"] == ["column 'title' is not valid UTF-8"]


def test_row_asking_for_more_tokens_than_the_job_allows(bad_job):
    [reason] = bad_job["reasons"]["too-many-tokens"]
    assert reason.startswith("max_new_tokens 100 exceeds the job's decode.max_new_tokens 8")


def test_dead_letters_keep_the_row_and_its_source(bad_job):
    [dup] = [d for d in dead_letters(bad_job["out"]) if d["id"] == "dup"]
    assert dup["source"].endswith("in.parquet") and '"prompt"' in dup["row_json"]
    assert bad_job["result"].metrics["dead_letters"] == len(dead_letters(bad_job["out"]))


# ---- refused before any work: nothing is written ---------------------------------------------

def _refusal(chat_model_dir, tmp_path, input, **flags) -> JobRefused:
    out = tmp_path / "out"
    with pytest.raises(JobRefused) as e:
        build(job_spec(flags.pop("model", chat_model_dir), input, out, **flags))
    assert not out.exists()
    return e.value


def test_wrong_column_type_is_refused_naming_the_column(chat_model_dir, tmp_path):
    write_prompts(tmp_path / "x.parquet", [{"id": "a", "prompt": 7}])
    e = _refusal(chat_model_dir, tmp_path, tmp_path / "x.parquet")
    assert e.field == "input" and "input column 'prompt' has type int64; expected string" in str(e)


def test_missing_template_column_is_refused(chat_model_dir, tmp_path):
    write_prompts(tmp_path / "x.parquet", [{"id": "a", "text": "hello"}])
    e = _refusal(chat_model_dir, tmp_path, tmp_path / "x.parquet", template="summarize")
    assert "input has no 'document' column, which template 'summarize' needs" in str(e)


def test_input_column_clashing_with_an_output_column_is_refused(chat_model_dir, tmp_path):
    write_prompts(tmp_path / "x.parquet", [{"id": "a", "prompt": "hi", "completion": "old"}])
    assert "'completion'" in str(_refusal(chat_model_dir, tmp_path, tmp_path / "x.parquet"))


def test_missing_input_path_is_refused(chat_model_dir, tmp_path):
    e = _refusal(chat_model_dir, tmp_path, tmp_path / "nowhere.parquet")
    assert e.field == "input" and "does not exist" in str(e)
    assert "matches no files" in str(_refusal(chat_model_dir, tmp_path, tmp_path / "none-*.parquet"))


def test_unreadable_input_file_is_refused(chat_model_dir, tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet at all")
    e = _refusal(chat_model_dir, tmp_path, tmp_path / "junk.parquet")
    assert "junk.parquet is not a readable Parquet file" in str(e)


def test_missing_model_path_is_refused(chat_model_dir, tmp_path):
    write_prompts(tmp_path / "x.parquet", [{"id": "a", "prompt": "hi"}])
    e = _refusal(chat_model_dir, tmp_path, tmp_path / "x.parquet", model=tmp_path / "no-model")
    assert e.field == "model.target" and "does not exist" in str(e)


def test_dflash_without_a_shipped_drafter_is_refused(chat_model_dir, tmp_path):
    write_prompts(tmp_path / "x.parquet", [{"id": "a", "prompt": "hi"}])
    e = _refusal(chat_model_dir, tmp_path, tmp_path / "x.parquet", mode="dflash", drafter="default")
    assert e.field == "model.drafter" and "no default drafter" in str(e)


# ---- mesh layouts this machine cannot run (the test process has one device) -------------------

def test_tensor_parallel_that_does_not_split_the_heads_is_refused(chat_model_dir, tmp_path):
    write_prompts(tmp_path / "x.parquet", [{"id": "a", "prompt": "hi"}])
    e = _refusal(chat_model_dir, tmp_path, tmp_path / "x.parquet", tensor_parallel=3)
    assert e.field == "decode.tensor_parallel"
    assert "4 query heads are not divisible by 3" in str(e) and "degrees that can: [1]" in str(e)


def test_more_replicas_than_devices_is_refused(chat_model_dir, tmp_path):
    write_prompts(tmp_path / "x.parquet", [{"id": "a", "prompt": "hi"}])
    e = _refusal(chat_model_dir, tmp_path, tmp_path / "x.parquet", data_parallel=2)
    assert e.field == "decode.data_parallel" and "needs 2 chips, but cpu x1 has 1" in str(e)


def test_a_batch_the_devices_cannot_hold_is_refused(chat_model_dir, tmp_path):
    write_prompts(tmp_path / "x.parquet", [{"id": "a", "prompt": "hi"}])
    e = _refusal(chat_model_dir, tmp_path, tmp_path / "x.parquet", batch_size=10**8)
    assert e.field == "decode.batch_size" and "does not fit cpu x1" in str(e)
