"""A whole job on the in-process runner: completions, carried columns, stats, metrics, model loads."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fresh_process import fresh_worker
from job_helpers import completions, dead_letters, job_spec, job_stats, sentence, write_prompts

from dflash_batch.pipeline import _model, build
from dflash_batch.schemas import COMPLETIONS_SCHEMA, schema_name, validate_completion_row

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA_A = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("messages", pa.list_(MESSAGE)),
                      ("temperature", pa.float32()), ("seed", pa.int64()), ("max_new_tokens", pa.int32()),
                      ("title", pa.string()), ("n", pa.int64()), ("tags", pa.list_(pa.string()))])


def _rows_a() -> list[dict]:
    rows = []
    for i in range(10):
        row = {"id": f"a{i}", "prompt": None, "messages": None, "temperature": None, "seed": None,
               "max_new_tokens": None, "title": f"title {i}", "n": i, "tags": [f"t{i}", "x"]}
        if i % 3 == 0:
            row["messages"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": sentence(i)}]
        else:
            row["prompt"] = sentence(i)
        if i % 4 == 1:
            row.update(temperature=0.9, seed=1000 + i)
        if i == 5:
            row["max_new_tokens"] = 3
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def job(chat_model_dir, tmp_path_factory):
    """Two input files (one lacking the extra columns); loaded by this job, as by a fresh worker."""
    root = tmp_path_factory.mktemp("job")
    write_prompts(root / "in" / "a.parquet", _rows_a(), SCHEMA_A)
    write_prompts(root / "in" / "b.parquet", [{"id": f"b{i}", "prompt": sentence(20 + i)} for i in range(5)])
    with fresh_worker():  # held for the module: the tests' later jobs find this job's model
        built = build(job_spec(chat_model_dir, root / "in" / "*.parquet", root / "out", rows_per_batch=4))
        result = built.run()
        yield {"built": built, "result": result, "out": root / "out", "in": root / "in"}


def test_every_row_gets_exactly_one_completion(job):
    ids = sorted(r["id"] for r in completions(job["out"]))
    assert ids == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(5)])
    assert dead_letters(job["out"]) == []


def test_completions_follow_the_contract_and_carry_input_columns(job):
    path = sorted(job["out"].glob("completions-*.parquet"))[0]
    schema = pq.read_schema(path)
    assert schema_name(schema) == "completions"
    assert schema.names[: len(COMPLETIONS_SCHEMA)] == COMPLETIONS_SCHEMA.names
    assert schema.field("tags").type == pa.list_(pa.string()) and schema.field("n").type == pa.int64()
    rows = {r["id"]: r for r in completions(job["out"])}
    for r in rows.values():
        assert validate_completion_row(r) is None, r
        assert r["mode"] == "ar" and r["drafter"] is None and r["model"] == str(job["built"].config.spec.model.target)
    assert rows["a4"]["title"] == "title 4" and rows["a4"]["n"] == 4 and rows["a4"]["tags"] == ["t4", "x"]
    assert rows["b2"]["title"] is None  # a column its file lacks is null, not an error
    assert rows["a5"]["completion_tokens"] <= 3  # the row's own max_new_tokens


def test_completions_equal_the_decoder_alone_on_the_same_prompts(job):
    """The pipeline adds nothing to a row's output: same tokens as the decoder given the same requests."""
    from dflash_batch.pipeline._decode import model_key
    from dflash_batch.pipeline._io import table_rows
    from dflash_batch.pipeline._tokenize import prepare_row

    config = job["built"].config
    tokenizer, _ = _model.shared_tokenizer(config.spec.model.target)
    items = [prepare_row(tokenizer, row, "f", config)
             for f in sorted(job["in"].glob("*.parquet")) for row in table_rows(pq.read_table(f))]
    model, _ = _model.shared_model(model_key(config))
    alone = {}
    for b in sorted({it.bucket for it in items}):
        alone.update({r.id: r.token_ids for r in model.decoder.generate(
            [it.request() for it in items if it.bucket == b], bucket=b)})
    assert {r["id"]: r["completion_token_ids"] for r in completions(job["out"])} == alone


def test_job_stats_add_up(job):
    stats = job_stats(job["out"])
    rows = completions(job["out"])
    assert stats["rows_in"] == 15 == stats["completions_out"] + stats["dead_letters"]
    assert stats["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert stats["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    assert stats["tau_mean"] == 1.0 and stats["mode"] == "ar" and stats["block_size"] == "1"
    assert sum(stats["tau_histogram"]) == sum(r["decode_steps"] for r in rows)
    assert set(json.loads(stats["padding_waste_json"])) <= {"16", "64"}
    assert stats["files"]["completions"] and all(p.startswith(str(job["out"])) for p in stats["files"]["completions"])
    assert stats["job_id"].endswith(job["built"].run_id)


def test_beam_metrics_count_rows_tokens_tau_and_batches(job):
    m = job["result"].metrics
    assert m["rows_in"] == 15 and m["completions"] == 15 and m.get("dead_letters", 0) == 0
    assert m["completion_tokens"] == job_stats(job["out"])["completion_tokens"]
    assert m["tau_x1000"]["count"] == 15 and m["tau_x1000"]["min"] == 1000
    assert m["batch_latency_ms"]["count"] == m["batch_rows"]["count"] >= 4  # 15 rows, 4 per batch
    assert m["batch_rows"]["max"] <= 4  # static batches never exceed rows_per_batch


def test_model_loads_once_per_process_not_per_batch(job, chat_model_dir, tmp_path):
    assert job["result"].metrics["batch_rows"]["count"] > 1
    assert job["result"].metrics["model_loads"] == 1
    # A second job with the same decoder shape in this process reuses the loaded model.
    again = build(job_spec(chat_model_dir, job["in"] / "b.parquet", tmp_path / "out")).run()
    assert again.metrics.get("model_loads", 0) == 0
    assert again.stats["completions_out"] == 5


def test_a_folder_as_input_means_the_parquet_files_in_it(job, chat_model_dir, tmp_path):
    built = build(job_spec(chat_model_dir, job["in"], tmp_path / "out"))
    assert built.preflight.files == tuple(str(p) for p in sorted(job["in"].glob("*.parquet")))
    assert built.preflight.rows_in == 15


def test_the_pipeline_takes_the_spec_object_and_records_it_as_given(job, chat_model_dir, tmp_path):
    from dflash_batch.pipeline import JobRefused, model_key

    spec = job_spec(chat_model_dir, job["in"] / "b.parquet", tmp_path / "out", name="as-given", top_p=0.5,
                    chunk_steps=4)
    built = build(spec)
    assert built.config.spec is spec  # the object itself, not a copy rebuilt from flags
    assert model_key(built.config).decode.chunk_steps == 4  # the decoder gets the spec's settings
    stats = built.run().stats
    assert stats["completions_out"] == 5 and stats["name"] == "as-given"
    assert stats["spec_json"] == spec.to_json()  # every setting, defaults included, as the spec holds it
    assert json.loads(stats["spec_json"])["decode"]["top_p"] == 0.5
    with pytest.raises(JobRefused, match="input"):
        build(job_spec(chat_model_dir, tmp_path / "missing.parquet", tmp_path / "out2"))


@pytest.mark.slow
def test_job_stats_record_the_automatic_block_choice_and_why(job, chat_model_dir, tmp_path):
    built = build(job_spec(chat_model_dir, job["in"] / "b.parquet", tmp_path / "out", mode="ngram",
                           block_size="auto"))
    stats = built.run().stats
    assert stats["block_size"] == "auto" and stats["block_choice"]
    for where, report in stats["block_choice"].items():
        assert " bucket " in where
        assert report["candidates"] == [1, 2, 4, 8, 16]
        # A job's warmup is lazy: AR and the smallest block are timed, larger ones once they could pay.
        assert {"1", "2"} <= set(report["step_ms"]) <= {"1", "2", "4", "8", "16"}
        assert sum(report["decode_calls_by_block"].values()) >= 1
        assert len(report["acceptance_q"]) == 15  # q_1..q_15 (unobserved ones count as 0)
        assert report["expected_tokens_per_step"]["1"] == 1.0  # AR is always a candidate
    assert job_stats(tmp_path / "out")["block_choice"] == stats["block_choice"]


@pytest.mark.slow
def test_a_hybrid_job_with_automatic_blocks_gives_the_ar_jobs_tokens(job, chat_model_dir, tmp_path):
    import jax

    from dflash_batch.decoder import load_target
    from dflash_batch.decoder._drafter_checkpoint import init_drafter_params, save_drafter
    from dflash_batch.decoder._drafter_config import DrafterConfig

    c = load_target(str(chat_model_dir), with_tokenizer=False).config
    dcfg = DrafterConfig(block_size=8, mask_token_id=3, target_layer_ids=(0, 1), num_layers=1,
                         hidden_size=c.hidden_size, intermediate_size=64, num_heads=c.num_heads,
                         num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
                         rms_norm_eps=c.rms_norm_eps, vocab_size=c.vocab_size)
    drafter = save_drafter(tmp_path / "drafter", dcfg, init_drafter_params(dcfg, jax.random.PRNGKey(1), scale=0.3))
    source = job["in"] / "a.parquet"  # greedy and sampled rows, one with its own max_new_tokens
    build(job_spec(chat_model_dir, source, tmp_path / "ar")).run()
    stats = build(job_spec(chat_model_dir, source, tmp_path / "hybrid", mode="hybrid", block_size="auto",
                           drafter=drafter)).run().stats
    ar = {r["id"]: r["completion_token_ids"] for r in completions(tmp_path / "ar")}
    hybrid = {r["id"]: r["completion_token_ids"] for r in completions(tmp_path / "hybrid")}
    assert len(ar) == 10 and hybrid == ar  # lossless, sampled rows included (seed for seed)
    assert {r["mode"] for r in completions(tmp_path / "hybrid")} == {"hybrid"}
    assert stats["block_choice"] and all(sum(r["decode_calls_by_block"].values()) >= 1
                                         for r in stats["block_choice"].values())
