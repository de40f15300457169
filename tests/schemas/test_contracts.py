"""The schema contracts: names, versions, carried columns, dead letters, Parquet round trips."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dflash_batch.schemas import (
    COMPLETIONS_SCHEMA,
    DEAD_LETTERS_SCHEMA,
    JOB_STATS_SCHEMA,
    PROMPTS_SCHEMA,
    SchemaError,
    dead_letter_key,
    dead_letter_row,
    row_to_json,
    schema_name,
    schema_version,
    validate_completion_row,
    with_extra_columns,
)

ALL = {"prompts": PROMPTS_SCHEMA, "completions": COMPLETIONS_SCHEMA,
       "dead_letters": DEAD_LETTERS_SCHEMA, "job_stats": JOB_STATS_SCHEMA}  # fmt: skip

PROMPT = {"id": "a", "prompt": "hi", "messages": None, "document": None, "max_new_tokens": 8,
          "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["\n\n"]}  # fmt: skip
COMPLETION = {
    "id": "a", "completion": "hello", "completion_token_ids": [1, 2], "finish_reason": "eos",
    "prompt_tokens": 4, "completion_tokens": 2, "decode_steps": 1, "acceptance_length_mean": 2.0,
    "accepted_per_step": [0, 1], "draft_tokens_proposed": 1, "draft_tokens_accepted": 1, "bucket": 64,
    "batch_index": 0, "worker": "w0", "decode_seconds": 0.1, "model": "m", "drafter": "d", "mode": "dflash",
    "dtype": "bfloat16", "prompt_truncated_tokens": 0,
}  # fmt: skip
DEAD = {"id": None, "kind": "missing_id", "error": "missing id", "row_json": "{}", "source": "in/0.parquet"}
STATS = {
    "job_id": "j", "spec_json": "{}", "rows_in": 2, "completions_out": 1, "dead_letters": 1,
    "prompt_tokens": 4, "completion_tokens": 2, "wall_seconds": 1.0, "decode_seconds": 0.5,
    "compile_seconds": 3.0, "tokens_per_s": 2.0, "tau_mean": 2.0, "tau_histogram": [0, 1],
    "padding_waste_json": '{"64": 0.25}', "mode": "dflash", "block_size": "auto:8", "batch_size": 8,
    "hardware": "cpu", "model": "m", "drafter": "d", "dtype": "bfloat16",
}  # fmt: skip
ROWS = {"prompts": PROMPT, "completions": COMPLETION, "dead_letters": DEAD, "job_stats": STATS}


@pytest.mark.parametrize("name", ALL)
def test_every_schema_names_itself_and_has_version_1(name):
    assert schema_name(ALL[name]) == name
    # v2: dead letters have a kind; completions record prompt tokens cut by prompt.truncate
    assert schema_version(ALL[name]) == (2 if name in ("dead_letters", "completions") else 1)


def test_schema_version_refuses_a_schema_without_metadata():
    with pytest.raises(SchemaError, match="schema_version"):
        schema_version(pa.schema([("id", pa.string())]))


def test_prompts_schema_has_the_documented_types():
    assert PROMPTS_SCHEMA.field("messages").type == pa.list_(
        pa.struct([("role", pa.string()), ("content", pa.string())])
    )
    assert PROMPTS_SCHEMA.field("max_new_tokens").type == pa.int32()
    assert PROMPTS_SCHEMA.field("seed").type == pa.int64()
    assert PROMPTS_SCHEMA.field("stop").type == pa.list_(pa.string())


@pytest.mark.parametrize("name", ALL)
def test_sample_row_covers_every_column(name):
    # Keeps the round-trip test honest: a column missing from the sample would go untested.
    assert set(ROWS[name]) == set(ALL[name].names)


@pytest.mark.parametrize("name", ALL)
def test_table_round_trips_through_parquet_with_its_version(name, tmp_path):
    table = pa.Table.from_pylist([ROWS[name]], schema=ALL[name])
    pq.write_table(table, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet")
    assert back.schema.equals(ALL[name], check_metadata=False)
    assert schema_version(back.schema) == schema_version(ALL[name]) and schema_name(back.schema) == name
    assert back.to_pylist() == table.to_pylist()


def test_completion_with_null_id_cannot_be_written(tmp_path):
    table = pa.Table.from_pylist([{**COMPLETION, "id": None}], schema=COMPLETIONS_SCHEMA)
    with pytest.raises(pa.ArrowInvalid, match="id"):
        pq.write_table(table, tmp_path / "t.parquet")


def test_with_extra_columns_carries_unknown_input_columns_with_their_types():
    inp = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("lang", pa.dictionary(pa.int8(), pa.string())),
                     ("score", pa.float64())])  # fmt: skip
    out = with_extra_columns(COMPLETIONS_SCHEMA, inp)
    assert out.names == COMPLETIONS_SCHEMA.names + ["lang", "score"]
    assert out.field("lang").type == pa.dictionary(pa.int8(), pa.string())
    assert out.field("score").type == pa.float64()
    assert schema_name(out) == "completions" and schema_version(out) == schema_version(COMPLETIONS_SCHEMA)


def test_with_extra_columns_drops_known_prompt_columns():
    out = with_extra_columns(COMPLETIONS_SCHEMA, PROMPTS_SCHEMA)
    assert out.names == COMPLETIONS_SCHEMA.names


def test_with_extra_columns_refuses_a_column_that_shadows_an_output():
    inp = pa.schema([("id", pa.string()), ("model", pa.string())])
    with pytest.raises(SchemaError, match="'model'"):
        with_extra_columns(COMPLETIONS_SCHEMA, inp)


def test_sample_completion_passes_its_self_check():
    assert validate_completion_row(COMPLETION) is None


def test_dead_letter_row_keeps_the_id_and_the_original_row():
    row = {"id": "x", "prompt": "", "seed": 7}
    dead = dead_letter_row(row, "invalid_row", "prompt is empty", "in/0.parquet")
    assert dead["id"] == "x" and dead["error"] == "prompt is empty" and dead["source"] == "in/0.parquet"
    assert dead["kind"] == "invalid_row"
    assert json.loads(dead["row_json"]) == row
    pa.Table.from_pylist([dead], schema=DEAD_LETTERS_SCHEMA)


def test_dead_letter_row_of_an_unwritable_row_is_still_writable(tmp_path):
    row = {"id": "bad\ud800", "blob": b"\x00\xff", "t": float("nan")}
    dead = dead_letter_row(row, "invalid_utf8", "id is not valid UTF-8", None)
    assert dead["id"] is None  # a lone surrogate cannot go into an Arrow string
    assert json.loads(dead["row_json"]) == {"id": "bad\ud800", "blob": "base64:AP8=", "t": "nan"}
    pq.write_table(pa.Table.from_pylist([dead], schema=DEAD_LETTERS_SCHEMA), tmp_path / "d.parquet")


def test_a_dead_letter_kind_must_be_a_known_one():
    with pytest.raises(ValueError, match="kind='too long'"):
        dead_letter_row({"id": "x"}, "too long", "prompt is long", None)


def test_a_dead_letter_is_keyed_by_its_id_unless_the_id_is_not_its_own():
    row = dead_letter_row({"id": "x", "prompt": ""}, "invalid_row", "prompt is empty", "a.parquet")
    twin = dead_letter_row({"id": "x", "prompt": "other"}, "duplicate_id", "duplicate id 'x'", "b.parquet")
    anonymous = dead_letter_row({"prompt": "p"}, "missing_id", "missing id", "a.parquet")
    assert dead_letter_key(row) == "x"
    assert len({dead_letter_key(row), dead_letter_key(twin), dead_letter_key(anonymous)}) == 3
    assert dead_letter_key(anonymous) == dead_letter_key(dict(anonymous))  # the same row, the same key


def test_row_to_json_handles_non_string_ids():
    assert json.loads(row_to_json({"id": 5})) == {"id": 5}
