"""``dflash-batch make-example-input OUT.parquet``: ACLSum abstracts as a prompts Parquet file.

Rows are ``{id, document, title}``: ``document`` is what the ``summarize`` template reads, and
``title`` is a column of the user's own, carried through to the completions untouched.
"""

from __future__ import annotations

import click
import pyarrow as pa

from dflash_batch.jobs._datasets import SPLITS

EXAMPLE_SCHEMA = pa.schema([("id", pa.string()), ("document", pa.string()), ("title", pa.string())])


def write_example_input(out: str, split: str = "test", limit: int | None = None) -> int:
    """Writes the abstracts of an ACLSum split to ``out`` (local path or gs://); returns the row count."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from dflash_batch.jobs._datasets import aclsum_abstracts

    rows = aclsum_abstracts(split)[:limit]
    table = pa.Table.from_pylist([{k: r[k] for k in EXAMPLE_SCHEMA.names} for r in rows], schema=EXAMPLE_SCHEMA)
    with FileSystems.create(out, mime_type="application/x-parquet", compression_type="uncompressed") as f:
        pq.write_table(table, f)
    return table.num_rows


@click.command("make-example-input")
@click.argument("out")
@click.option("--split", default="test", show_default=True, type=click.Choice(SPLITS))
@click.option("--limit", default=None, type=click.IntRange(1), help="Only the first N abstracts.")
def make_example_input_command(out: str, split: str, limit: int | None) -> None:
    """Write ACLSum SPLIT abstracts to OUT (a .parquet path, local or gs://) as job input."""
    try:
        n = write_example_input(out, split, limit)
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {n} ACLSum {split} abstracts to {out} (columns id, document, title)")
