"""``python -m dflash_batch.pipeline --input ... --output ... --model ... [Beam flags]``: run a job
from flags alone (the entry a Dataflow template or a container would call)."""

import json
import sys

from dflash_batch.pipeline import JobRefused, run_job


def main(argv: list[str]) -> int:
    try:
        result = run_job(argv)
    except JobRefused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
