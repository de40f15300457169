"""How fast one target decode step runs in each dtype on this machine: the numbers behind
``decoder._dtype``'s choice for ``dtype = "auto"`` on CPU.

    python tools/dtype_speed.py [--model smollm2-135m-instruct] [--rows 1,8,16]
        [--repeats 7] [--context 256]

Algorithm:
  1. Load the target once per dtype (weights cast at load, as a job does) and make a KV cache
     of that dtype holding ``context`` rows per sequence.
  2. Compile one forward per (dtype, rows): ``rows`` sequences, one new token each, at
     position ``context``: a decode step of a batch of ``rows``.
  3. Time them interleaved: each repeat runs every (dtype, rows) cell once, so a slow spell of
     a shared machine falls on both dtypes alike rather than on whichever ran during it.
  4. Print, per rows, the median milliseconds of each dtype and float32 / bfloat16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp


def _step(model, rows: int, context: int, dtype):
    """A compiled decode step of ``rows`` sequences and its arguments."""
    from dflash_batch.decoder import KVCache, forward

    cfg = model.config
    shape = (cfg.num_layers, rows, cfg.num_kv_heads, context + 8, cfg.head_dim)
    cache = KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))  # the KV cache in the model's dtype
    tokens = jnp.ones((rows, 1), jnp.int32)
    start = jnp.full((rows,), context, jnp.int32)
    fn = jax.jit(lambda p, t, s, c: forward(p, cfg, t, s, c)[0])
    jax.block_until_ready(fn(model.params, tokens, start, cache))  # compile outside the timing
    return lambda: jax.block_until_ready(fn(model.params, tokens, start, cache))


def measure(model_name: str, rows: list[int], repeats: int, context: int) -> list[dict]:
    from dflash_batch.decoder import load_target

    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    cells = {}
    for name, dtype in dtypes.items():
        model = load_target(model_name, dtype=dtype, with_tokenizer=False)
        for r in rows:
            cells[(name, r)] = _step(model, r, context, dtype)
    times: dict[tuple[str, int], list[float]] = {k: [] for k in cells}
    for i in range(repeats):
        order = list(cells) if i % 2 == 0 else list(reversed(cells))  # neither dtype always first
        for key in order:
            t0 = time.perf_counter()
            cells[key]()
            times[key].append(1000 * (time.perf_counter() - t0))
    out = []
    for r in rows:
        f32, bf16 = statistics.median(times[("float32", r)]), statistics.median(times[("bfloat16", r)])
        out.append({"rows": r, "float32_ms": round(f32, 1), "bfloat16_ms": round(bf16, 1),
                    "float32_over_bfloat16": round(f32 / bf16, 2)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", default="1,8,16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--context", type=int, default=256)
    a = ap.parse_args()
    result = measure(a.model, [int(x) for x in a.rows.split(",")], a.repeats, a.context)
    print(f"{jax.default_backend()} x{jax.device_count()}, {a.model}, one decode step at context {a.context}, "
          f"median of {a.repeats} interleaved repeats")
    print("| rows | float32 ms | bfloat16 ms | float32 / bfloat16 |")
    print("|---:|---:|---:|---:|")
    for row in result:
        print(f"| {row['rows']} | {row['float32_ms']} | {row['bfloat16_ms']} | {row['float32_over_bfloat16']}x |")


if __name__ == "__main__":
    main()
