"""`dflash-batch bench` where Apache Beam is not installed: a lent accelerator host.

The bench command lives in the CLI, which imports the pipeline (and so Beam); an accelerator
host that only trains or measures has JAX, transformers and torch, and no Beam. This runs the
same side-by-side rounds (``jobs._bench.bench``) on prompts from a Parquet file (the job's
input schema, e.g. the ACLSum test prompts that ``train_drafter_device.sh`` carries), and writes
the table and the JSON rows. A wall-clock budget is enforced between batch sizes: a batch size
that starts always finishes, and the ones after the budget are skipped and named.

    python -P tools/device_bench.py --prompts .train-work/device/test-prompts.parquet \\
        --drafter .train-work/device/drafter --batch-sizes 1,16,64 --dtypes bfloat16 --out results/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--drafter", default=None, help="drafter folder [default: the model's shipped one]")
    p.add_argument("--prompts", type=Path, required=True, help="Parquet prompts (a job's input schema)")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--block-sizes", default="16")
    p.add_argument("--modes", default="dflash,ngram,hybrid")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--learning-rounds", type=int, default=1)
    p.add_argument("--no-auto", action="store_true", help="fixed block lengths only (each auto compiles them all)")
    p.add_argument("--budget", type=float, default=0, help="seconds; 0: no limit")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    import jax

    from dflash_batch.decoder import DRAFTER_MODES, ROWS_PER_SLOT, Request, resolve_drafter_dir
    from dflash_batch.jobs._bench import bench, format_table, load_bench_models
    from dflash_batch.jobs._train_cli import read_prompts

    t0 = time.perf_counter()
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    batch_sizes, modes = ints(a.batch_sizes), [m for m in a.modes.split(",") if m]
    folder = resolve_drafter_dir(a.drafter or "default", a.model) if set(modes) & set(DRAFTER_MODES) else None
    models = load_bench_models(a.model, folder, [d for d in a.dtypes.split(",") if d])
    tokenizer = models[0].target.tokenizer
    prompts, bad = read_prompts(a.prompts, tokenizer, limit=a.num_prompts or ROWS_PER_SLOT * max(batch_sizes))
    reqs = [Request(id=i, token_ids=ids, max_new_tokens=a.max_new_tokens) for i, ids in prompts]
    a.out.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    for b in batch_sizes:
        if a.budget and time.perf_counter() - t0 > a.budget:
            skipped.append(b)
            continue
        rows += bench(models, reqs, [b], a.max_new_tokens, repeats=a.repeats, block_sizes=ints(a.block_sizes),
                      modes=modes, num_prompts=a.num_prompts, learning_rounds=a.learning_rounds,
                      auto=not a.no_auto,
                      progress=lambda m: print(m, file=sys.stderr, flush=True))
        (a.out / "bench.json").write_text(json.dumps(rows, indent=2))  # what is done survives a kill
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    table = (f"{device}; {len(reqs)} prompts from {a.prompts.name} ({len(bad)} invalid), up to {a.max_new_tokens} "
             f"new tokens, {a.repeats} round(s) after {a.learning_rounds} uncounted; drafter {folder}\n"
             + format_table(rows)
             + (f"\nskipped batch sizes (budget {a.budget:.0f}s spent): {skipped}" if skipped else ""))
    (a.out / "bench.txt").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
