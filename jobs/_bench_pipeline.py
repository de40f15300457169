"""``dflash-batch bench-pipeline JOB.toml``: what the Beam pipeline costs on top of the decoder.

Both sides decode the same prompts in one process with the same compiled decoder, which is
warmed up first (compiled, and one row decoded untimed), so compile time and model loading are
left out of both:

  decoder only: the job's prompts, rendered and bucketed as the job does, straight through
                ``Decoder.generate`` (one stream per bucket: the decoder's best case);
  job:          the whole pipeline on the in-process runner (read, validate, dedup, tokenize,
                shuffle into batches, decode, write Parquet, write job stats), its wall time
                from ``job_stats.json``.

overhead ratio = job tokens/s / decoder-only tokens/s (1.0 = free; the aim is >= 0.9). The
pipeline's costs are mostly fixed (runner start-up, two shuffles, Parquet writes), so the ratio
rises with the amount of decoding; run it on a job-sized input for a number that means something.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from dflash_batch.jobs._exit import Refused


def _prepared(job) -> list:
    """The job's input rows as the pipeline would hand them to the decoder (dead letters dropped)."""
    from apache_beam.io.filesystems import FileSystems
    import pyarrow.parquet as pq

    from dflash_batch.pipeline import prepare_row, shared_tokenizer, table_rows
    from dflash_batch.schemas import validate_prompt_row

    tokenizer, _ = shared_tokenizer(job.config.spec.model.target)
    seen: set[str] = set()
    out = []
    for path in job.preflight.files:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            table = pq.read_table(f)
        for row in table_rows(table):
            if validate_prompt_row(row, job.config.spec.prompt.template, seen) is None:
                item = prepare_row(tokenizer, row, path, job.config)
                if not isinstance(item, tuple):  # (kind, reason): a row this job cannot decode
                    out.append(item)
    return out


def bench_pipeline(spec, repeats: int = 1, progress=None) -> dict[str, Any]:
    """Decoder-only and job tokens/s on the same prompts (medians over ``repeats``)."""
    import statistics

    from dflash_batch.pipeline import build, model_key, shared_model

    say = progress or (lambda _m: None)
    with tempfile.TemporaryDirectory(prefix="dflash-bench-") as tmp:
        first = build(dataclasses.replace(spec, output=f"{tmp}/probe"))
        items = _prepared(first)
        if not items:
            raise ValueError("no row of the input can be decoded")
        model, _ = shared_model(model_key(first.config))
        buckets = sorted({it.bucket for it in items})
        t0 = time.perf_counter()
        for b in buckets:
            model.decoder.warmup(b)
            # One real row per bucket, untimed: the first generate also compiles small helper
            # programs (sampling keys, slot updates) that warmup does not cover.
            list(model.decoder.generate([next(it for it in items if it.bucket == b).request()], bucket=b))
        say(f"warmed up buckets {buckets} in {time.perf_counter() - t0:.1f} s")

        decoder_speeds, job_speeds, tokens = [], [], {}
        for i in range(repeats):
            t0 = time.perf_counter()
            n = 0
            for b in buckets:
                for r in model.decoder.generate([it.request() for it in items if it.bucket == b], bucket=b):
                    n += r.completion_tokens
            decoder_speeds.append(n / (time.perf_counter() - t0))
            tokens["decoder_only"] = n
            say(f"decoder only: {decoder_speeds[-1]:.1f} tokens/s ({n} tokens)")

            stats = build(dataclasses.replace(spec, output=f"{tmp}/job-{i}")).run().stats
            job_speeds.append(stats["tokens_per_s"])
            tokens["job"] = stats["completion_tokens"]
            say(f"job:          {job_speeds[-1]:.1f} tokens/s ({stats['completion_tokens']} tokens, "
                f"{stats['wall_seconds']:.1f} s wall, compile {stats['compile_seconds']:.1f} s)")
    dec, job = statistics.median(decoder_speeds), statistics.median(job_speeds)
    return {"rows": len(items), "buckets": buckets, "mode": spec.decode.mode, "dtype": first.config.dtype,
            "batch_size": spec.decode.batch_size,
            "decoder_only_tokens_per_s": round(dec, 2), "job_tokens_per_s": round(job, 2),
            "overhead_ratio": round(job / dec, 3), "completion_tokens": tokens, "repeats": repeats,
            "decoder_only_runs": decoder_speeds, "job_runs": job_speeds}


@click.command("bench-pipeline")
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a spec value.")
@click.option("--limit", default=None, type=click.IntRange(1), help="Only the first N input rows.")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(1), help="Median over this many runs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def bench_pipeline_command(job_file: Path, overrides: tuple[str, ...], limit: int | None, repeats: int,
                           as_json: bool) -> None:
    """Pipeline overhead: the job's tokens/s over decoder-only tokens/s on the same prompts.

    The job's own output setting is not used: both runs write into a temporary folder.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dflash_batch.jobs._spec import SpecError, load_spec
    from dflash_batch.pipeline import JobRefused

    try:
        spec = load_spec(job_file, overrides).require_direct()
    except SpecError as e:
        raise Refused(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="dflash-bench-input-") as tmp:
        if limit is not None:
            from dflash_batch.pipeline import match_files

            tables = [pq.read_table(f) for f in match_files(spec.input)]
            if not tables:
                raise Refused(f"input: {spec.input!r} matches no files")
            pq.write_table(pa.concat_tables(tables, promote_options="default").slice(0, limit), f"{tmp}/input.parquet")
            spec = dataclasses.replace(spec, input=f"{tmp}/input.parquet")
        try:
            report = bench_pipeline(spec, repeats, progress=None if as_json else lambda m: click.echo(m, err=True))
        except (JobRefused, ValueError) as e:
            raise Refused(str(e)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['rows']} rows, buckets {report['buckets']}, mode {report['mode']}, "
               f"dtype {report['dtype']}, batch {report['batch_size']}, median of {repeats}")
    click.echo(f"  decoder only: {report['decoder_only_tokens_per_s']:.1f} tokens/s")
    click.echo(f"  whole job:    {report['job_tokens_per_s']:.1f} tokens/s")
    click.echo(f"  overhead ratio (job / decoder): {report['overhead_ratio']:.3f}  (aim: >= 0.9)")
