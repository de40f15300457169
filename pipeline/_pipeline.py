"""The job as a Beam pipeline: ``build`` wires the labelled steps, ``BuiltJob.run`` runs them.

    ReadPrompts -> KeyById -> GroupById (+ ids already completed) -> OnePerId -> Validate
      -> Tokenize -> Bucket -> Batch -> Decode (saves its completions and failures as parts)
    earlier steps' dead letters -> DeadLetters -> GroupDeadLetters -> WriteDeadLetters
    Decode's batch records -> SumBatchStats -> WriteJobStats (after every part is written)

Output layout (OUTPUT is a folder or a gs:// prefix):
    OUTPUT/completions-<hash of ids>.parquet    completions schema + the input's own columns
    OUTPUT/dead_letters-<hash of keys>.parquet  dead-letters schema (id, kind, error, row_json, source)
    OUTPUT/run_stats-<run>.json                 what each run did: its figures (see ``_figures``)
    OUTPUT/job_stats.json                       the job over all its runs; written last, so it marks a finished run
    OUTPUT/job_manifest.json                    the settings every completion here was made with

Durable progress: the parquet files are "parts" of at most ``pipeline.rows_per_file`` rows,
written while the job runs and named by the rows they hold (see ``_parts``), so a run that
dies keeps what it saved, losing at most one unwritten part per worker.

Reruns and chunks: skip ids already completed. A run into an output that holds parts reads the
ids of every ``completions-*.parquet`` there and decodes only the rows without one. No run
deletes another run's parts; dead letters are re-derived by each run from its own input (the
same rows make the same part name, so a rerun rewrites its file). Readers count the union
keyed by id (``_outcomes``): a duplicate from a retry counts once, a dead letter whose id was
completed later no longer counts. Together: rows in (of every input file any run read) =
completions + dead letters, after every finished run. A rerun under
settings that change completions (model, dtype, template, sampling, max_new_tokens) is refused, since
it would mix outputs; ``job_manifest.json`` records them. Why not "replace deterministically":
it re-decodes everything after an interruption, the expensive part of a job.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
import uuid
from typing import Any, Callable, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadAllFromParquetBatched
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pvalue import AsList, AsSingleton

from dflash_batch.pipeline._batching import KeyByBucket, static_batches
from dflash_batch.pipeline._config import JobConfig, job_config
from dflash_batch.pipeline._context import check_context, model_context
from dflash_batch.pipeline._decode import STATS, Decode
from dflash_batch.pipeline._model import job_dtype
from dflash_batch.pipeline._io import DEAD_LETTERS_PREFIX, JOB_STATS_FILE, MANIFEST_FILE, delete, join, \
    read_json, use_anonymous_gcs_for_emulator, write_json
from dflash_batch.pipeline._parts import KeyForParts, WriteParts
from dflash_batch.pipeline._preflight import Preflight, check_layout, preflight
from dflash_batch.pipeline._rows import DEAD, NAMESPACE, SKIPPED, CountDeadLetters, CountSkipped, KeyById, \
    OnePerId, ToRows, Validate
from dflash_batch.pipeline._stats import BatchStatsFn, WriteJobStats, job_id
from dflash_batch.pipeline._tokenize import Tokenize
from dflash_batch.schemas import DEAD_LETTERS_SCHEMA, dead_letter_key

_LOCAL_RUNNERS = (None, "DirectRunner", "direct", "FnApiRunner")


def new_run_id() -> str:
    """Sortable and unique: UTC time plus a random tag."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:6]}"


def _ids_of(table) -> list[tuple[str, None]]:
    return [(rid, None) for rid in table.column("id").to_pylist() if rid is not None]


@dataclasses.dataclass
class JobResult:
    """What a finished run reports: the job-stats record, Beam's metrics, the final state."""

    stats: dict[str, Any]
    metrics: dict[str, Any]
    state: str


@dataclasses.dataclass
class BuiltJob:
    """A constructed (not yet run) job. ``outputs`` holds the main PCollections for tests."""

    pipeline: beam.Pipeline
    config: JobConfig
    preflight: Preflight
    run_id: str
    outputs: dict[str, beam.PCollection]

    @property
    def job_id(self) -> str:
        """This run's id, as the ledger, ``job_stats.json`` and the report name it."""
        return job_id(self.config.spec.name, self.run_id)

    def prepare_output(self) -> None:
        """Marks the output as in progress: the stale job_stats.json goes, the manifest is written."""
        out = self.config.output
        delete([p for p in [join(out, JOB_STATS_FILE)] if FileSystems.exists(p)])
        if read_json(join(out, MANIFEST_FILE)) is None:
            write_json(join(out, MANIFEST_FILE), self.preflight.manifest)

    def run(self) -> JobResult:
        """Runs the job to the end; raises RuntimeError when the runner reports a failure."""
        self.prepare_output()
        result = self.pipeline.run()
        state = result.wait_until_finish()
        if state != beam.runners.runner.PipelineState.DONE:
            raise RuntimeError(f"job {self.config.spec.name} ended in state {state}")
        stats = read_json(join(self.config.output, JOB_STATS_FILE))
        return JobResult(stats=stats or {}, metrics=metrics_summary(result), state=str(state))


def metrics_summary(result) -> dict[str, Any]:
    """The job's Beam counters and distributions (namespace dflash_batch), summed over steps."""
    out: dict[str, Any] = {}
    query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))
    for c in query["counters"]:
        name = c.key.metric.name
        out[name] = out.get(name, 0) + (c.committed if c.committed is not None else c.attempted)
    for d in query["distributions"]:
        v = d.committed if d.committed is not None else d.attempted
        out[d.key.metric.name] = {"count": v.count, "sum": v.sum, "min": v.min, "max": v.max, "mean": v.mean}
    return out


def _new_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """Local jobs run on Beam's FnApiRunner directly, not through ``DirectRunner``: in Beam 2.77
    that one first tries to download and start the Prism runner, and sends pipelines with
    ``GroupIntoBatches`` to its legacy runner, which ignores multi-processing and loses metrics
    (see ``_batching``). Other runners (Dataflow) are used as named."""
    if options.view_as(StandardOptions).runner in _LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)


def build(spec: Any, beam_options: Sequence[str] = (), test_pipeline: beam.Pipeline | None = None,
          run_id: str | None = None, check: Callable[[JobConfig], Preflight] | None = None,
          progress_dir: str | None = None) -> BuiltJob:
    """Checks the job (raising ``JobRefused`` before any work) and constructs its pipeline.

    ``spec``: the job spec (``jobs.JobSpec``), already validated; the pipeline runs under Beam's
    flags for its runner (``spec.beam_options()``), then ``beam_options`` (e.g. ``--dry_run``).
    ``test_pipeline``: build into this pipeline instead (e.g. a ``TestPipeline``).
    ``check``: replaces the preflight (which lists the input and reads the model's config),
    e.g. for an offline Dataflow dry run that must not touch gs://.
    ``progress_dir``: a local folder where the steps report live progress.
    """
    options = PipelineOptions([*spec.beam_options(), *beam_options])
    use_anonymous_gcs_for_emulator()
    FileSystems.set_options(options)
    config = job_config(spec, options, progress_dir)
    pre = (check or preflight)(config)
    # A preflight that read no checkpoint (the offline dry run) leaves "auto" to the platform alone.
    config = dataclasses.replace(config, drafter=pre.drafter, dtype=pre.dtype or job_dtype(spec),
                                 rows_in=pre.rows_in or None)
    if check is None:  # a replaced check (an offline dry run) must not read the model
        context = model_context(spec.model.target)
        check_context(spec, context)
        config = dataclasses.replace(config, context_tokens=context)
    if check is None and options.view_as(StandardOptions).runner in _LOCAL_RUNNERS:
        pre = dataclasses.replace(pre, plan=check_layout(config))  # this machine's devices, before loading
    run_id = run_id or new_run_id()
    started = time.time()
    p = test_pipeline if test_pipeline is not None else _new_pipeline(options)

    rows = (p
            | "ListInputs" >> beam.Create(pre.files)
            | "ReadPrompts" >> ReadAllFromParquetBatched(with_filename=True)
            | "ToRows" >> beam.ParDo(ToRows(spec.prompt.template)))
    keyed = rows | "KeyById" >> beam.ParDo(KeyById(spec.prompt.template)).with_outputs(DEAD, main="keyed")
    if pre.previous_completions:
        done = (p
                | "ListCompleted" >> beam.Create(pre.previous_completions)
                | "ReadCompletedIds" >> ReadAllFromParquetBatched(columns=["id"])
                | "CompletedIds" >> beam.FlatMap(_ids_of))
    else:
        done = p | "NoneCompleted" >> beam.Create([])
    one = ({"rows": keyed.keyed, "done": done}
           | "GroupById" >> beam.CoGroupByKey()
           | "OnePerId" >> beam.ParDo(OnePerId()).with_outputs(DEAD, SKIPPED, main="rows"))
    valid = one.rows | "Validate" >> beam.ParDo(Validate(spec.prompt.template)).with_outputs(DEAD, main="valid")
    prepared = valid.valid | "Tokenize" >> beam.ParDo(Tokenize(config)).with_outputs(DEAD, main="prepared")
    decoded = (prepared.prepared
               | "Bucket" >> beam.ParDo(KeyByBucket(config.shards_per_bucket))
               | "Batch" >> static_batches(config.rows_per_batch)
               | "Spread" >> beam.Reshuffle()  # decode batches on every worker (see _batching)
               | "Decode" >> beam.ParDo(Decode(config, pre.completions_schema)).with_outputs(
                   DEAD, STATS, main="completions"))  # Decode saves its own rows as it goes (see _parts)

    early_dead = ((keyed[DEAD], one[DEAD], valid[DEAD], prepared[DEAD])
                  | "DeadLetters" >> beam.Flatten()
                  | "CountDeadLetters" >> beam.ParDo(CountDeadLetters(config.progress_dir)))
    dead_files = (early_dead
                  | "KeyDeadLetters" >> beam.ParDo(KeyForParts())
                  | "GroupDeadLetters" >> beam.GroupByKey()
                  | "WriteDeadLetters" >> beam.ParDo(WriteParts(config.output, DEAD_LETTERS_PREFIX, DEAD_LETTERS_SCHEMA,
                                                                dead_letter_key, config.rows_per_file)))
    decode_dead = decoded[DEAD] | "CountDecodeFailures" >> beam.ParDo(CountDeadLetters(config.progress_dir))
    dead = (early_dead, decode_dead) | "AllDeadLetters" >> beam.Flatten()

    skipped = one[SKIPPED] | "CountSkipped" >> beam.ParDo(CountSkipped(config.progress_dir))
    stats = (p
             | "Finish" >> beam.Create([None])
             | "WriteJobStats" >> beam.ParDo(
                 WriteJobStats(config, run_id, started, tuple(pre.files)),
                 sums=AsSingleton(decoded[STATS] | "SumBatchStats" >> beam.CombineGlobally(BatchStatsFn())),
                 rows_in=AsSingleton(rows | "CountRowsIn" >> beam.combiners.Count.Globally()),
                 dead_letters=AsSingleton(dead | "CountDead" >> beam.combiners.Count.Globally()),
                 skipped=AsSingleton(skipped | "CountSkippedIds" >> beam.combiners.Count.Globally()),
                 dead_files=AsList(dead_files)))
    outputs = {"completions": decoded.completions, "dead_letters": dead, "job_stats": stats}
    return BuiltJob(pipeline=p, config=config, preflight=pre, run_id=run_id, outputs=outputs)
