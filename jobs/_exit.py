"""The exit statuses of every ``dflash-batch`` command, one convention for the whole CLI:

- 0: done;
- 1: the work started and failed (a run that failed or was interrupted: run it again to resume);
- 2: refused before any work started: a bad job spec or argument, or wrong usage (click's own
  usage errors exit 2 as well).

``train-drafter`` adds 75 (EX_TEMPFAIL): stopped by a signal after a checkpoint, resumable.
"""

from __future__ import annotations

import click

FAILED = 1
REFUSED = 2


class Refused(click.ClickException):
    """A refusal before any work: printed as ``Error: ...``, exit status 2."""

    exit_code = REFUSED
