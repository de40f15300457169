"""Row-level steps before tokenizing: rows from Parquet, one outcome per id, validation.

Errors are data: every step here turns a bad row into a dead-letter row with a reason and
never raises, so one bad row cannot fail a bundle (and with it, on a retrying runner, the job).

Duplicate ids. An id must map to exactly one outcome, so rows are grouped by id across all
files and workers (a ``CoGroupByKey``; a per-worker "seen" set would miss duplicates that land
on different workers). One row of each id goes on (the first in (file, row content) order, which
does not depend on read order, so a rerun keeps the same row); the others are dead letters. The
same grouping joins the ids that already have completions in the output folder from an earlier
run of the job: those rows are skipped (see ``_pipeline`` on reruns).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from dflash_batch.pipeline._io import UNREADABLE, table_rows
from dflash_batch.schemas import dead_letter_row, row_to_json, validate_prompt_row

NAMESPACE = "dflash_batch"
DEAD = "dead_letters"
SKIPPED = "skipped"

_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Keys of a stand-in row (see ``_rejected``); no input column is named like this.
REJECTED = "__dflash_batch_rejected__"
REJECTED_KIND = "__dflash_batch_rejected_kind__"
ROW_JSON = "__dflash_batch_row_json__"


def _show(value: str, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _surrogate_in(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_SURROGATE.search(value))
    if isinstance(value, dict):
        return any(_surrogate_in(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_surrogate_in(v) for v in value)
    return False


def utf8_problem(row: dict[str, Any]) -> str | None:
    """Which column holds text that is not valid UTF-8 (decoded to lone surrogates), or None."""
    for name, value in row.items():
        if _surrogate_in(value):
            return f"column {name!r} is not valid UTF-8"
    return None


def _rejected(row: dict[str, Any], kind: str, reason: str) -> dict[str, Any]:
    """A stand-in for a row that is already known to be bad and cannot travel as it is.

    Beam's coders encode strings as UTF-8, so a row holding invalid UTF-8 (lone surrogates)
    must not leave the step that read it. It keeps its id when that is clean, so duplicates of
    the id still resolve to one outcome, and the original row as JSON for its dead letter.
    """
    rid = row.get("id")
    clean_id = rid if isinstance(rid, str) and not _surrogate_in(rid) else None
    return {"id": clean_id, REJECTED: reason, REJECTED_KIND: kind, ROW_JSON: row_to_json(row)}


def dead_letter(row: dict[str, Any], kind: str, reason: str, source: str | None) -> dict[str, Any]:
    """A dead-letter row; a stand-in row (``_rejected``) brings the original row's JSON along."""
    if REJECTED in row:
        return {"id": row["id"], "kind": kind, "error": reason, "row_json": row[ROW_JSON], "source": source}
    return dead_letter_row(row, kind, reason, source)


def _invalid(row: dict[str, Any], template: str) -> tuple[str, str] | None:
    """(kind, reason) when the row cannot be decoded under the template, else None."""
    if REJECTED in row:
        return row[REJECTED_KIND], row[REJECTED]
    reason = validate_prompt_row(row, template)
    return ("invalid_row", reason) if reason else None


class ToRows(beam.DoFn):
    """(file, pyarrow.Table) -> (file, row dict), counting rows in."""

    def __init__(self, template: str):
        self.template = template
        self.rows_in = Metrics.counter(NAMESPACE, "rows_in")

    def process(self, element: tuple[str, Any]) -> Iterable[tuple[str, dict]]:
        source, table = element
        self.rows_in.inc(table.num_rows)
        for row in table_rows(table):
            if UNREADABLE in row:
                row = {"id": None, REJECTED: row[UNREADABLE], REJECTED_KIND: "unreadable", ROW_JSON: "{}"}
            elif _surrogate_in(row):
                reason = validate_prompt_row(row, self.template)
                kind = "invalid_row" if reason else "invalid_utf8"
                row = _rejected(row, kind, reason or utf8_problem(row) or "row is not valid UTF-8")
            yield source, row


def _usable_key(rid: Any) -> bool:
    return isinstance(rid, str) and bool(rid.strip())


class KeyById(beam.DoFn):
    """Rows with a usable id -> (id, (file, row)); rows without one are dead letters at once."""

    def __init__(self, template: str):
        self.template = template

    def process(self, element: tuple[str, dict]):
        source, row = element
        if _usable_key(row.get("id")):
            yield row["id"], (source, row)
        else:
            kind, reason = _invalid(row, self.template) or ("missing_id", "missing id")
            if kind == "invalid_row":  # the validator names the id's problem (null, empty, not a string)
                kind = "missing_id"
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(row, kind, reason, source))


class OnePerId(beam.DoFn):
    """(id, {rows, done}) -> one row per id; the rest dead letters; done ids skipped."""

    def __init__(self):
        self.skipped = Metrics.counter(NAMESPACE, "skipped_completed")

    def process(self, element: tuple[str, dict[str, list]]):
        rid, groups = element
        rows = list(groups["rows"])
        if not rows:  # an id completed earlier that is no longer in the input
            return
        if len(rows) > 1:
            rows.sort(key=lambda sr: (sr[0], sr[1].get(ROW_JSON) or row_to_json(sr[1])))
            kept_from = rows[0][0]
            for source, row in rows[1:]:
                reason = (f"duplicate id {_show(rid)}: {len(rows)} rows share it; "
                          f"one row (from {kept_from}) is decoded")
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(row, "duplicate_id", reason, source))
        if any(True for _ in groups["done"]):
            self.skipped.inc()
            yield beam.pvalue.TaggedOutput(SKIPPED, rid)
        else:
            yield rows[0]


class Validate(beam.DoFn):
    """(file, row) -> the same when the row can be decoded under the template, else a dead letter."""

    def __init__(self, template: str):
        self.template = template

    def process(self, element: tuple[str, dict]):
        source, row = element
        try:
            invalid = _invalid(row, self.template)
        except Exception as e:  # noqa: BLE001 - a validator bug must not fail the bundle
            invalid = ("invalid_row", f"validation failed: {type(e).__name__}: {e}")
        if invalid:
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(row, *invalid, source))
        else:
            yield source, row


class CountDeadLetters(beam.DoFn):
    """Counts dead letters (Beam metric and local progress) on their way to the writer."""

    def __init__(self, progress_dir: str | None):
        self.progress_dir = progress_dir

    def setup(self):
        from dflash_batch.pipeline._progress import ProgressLog

        self.dead = Metrics.counter(NAMESPACE, "dead_letters")
        self.progress = ProgressLog(self.progress_dir)
        self.pending = 0

    def process(self, row: dict):
        self.dead.inc()
        self.pending += 1
        yield row

    def finish_bundle(self):
        if self.pending:
            self.progress.report(dead_letters=self.pending)
            self.pending = 0


class CountSkipped(beam.DoFn):
    """Reports rows skipped because an earlier run completed them (local progress)."""

    def __init__(self, progress_dir: str | None):
        self.progress_dir = progress_dir

    def setup(self):
        from dflash_batch.pipeline._progress import ProgressLog

        self.progress = ProgressLog(self.progress_dir)
        self.pending = 0

    def process(self, rid: str):
        self.pending += 1
        yield rid

    def finish_bundle(self):
        if self.pending:
            self.progress.report(skipped=self.pending)
            self.pending = 0
