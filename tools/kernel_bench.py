"""Times the attention kernels against their jnp references at realistic sizes.

    python tools/kernel_bench.py [--quick] [--json out.json] ...

Shapes: SmolLM2-135M (K=3 kv heads, G=3, H=64) and Qwen3-8B (K=8, G=4, H=128), batch
1-64, cache capacity 512-8192 with ragged lengths (uniform in [S/2, S], one row at 0),
block T = 8 / 16, bf16. Both ops: verify (causal block) and draft (non-causal block).

On TPU both the Pallas kernel and the reference run. Elsewhere the kernel does not (it
is a Mosaic TPU kernel): on GPU the reference runs at the full sizes, and on CPU the
script says there is no accelerator and times the reference at a couple of small sizes.

Each number is the median wall time of ``--repeats`` jitted calls after a compile
call; "GB/s" is the valid cache bytes (K and V rows < length) over that time, the
figure to hold against the chip's memory bandwidth, since this attention is
memory-bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dflash_batch.kernels import (DraftBlockSizes, VerifyBlockSizes, draft_attention, reference_draft_attention,
                                  reference_verify_attention, verify_attention)

MODELS = {"smollm2-135m": (3, 3, 64), "qwen3-8b": (8, 4, 128)}  # K, G, H
OPS = {
    "verify": (verify_attention, reference_verify_attention, VerifyBlockSizes),
    "draft": (draft_attention, reference_draft_attention, DraftBlockSizes),
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _inputs(key, b, t, k, g, h, s, dtype):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (b, t, k, g, h), dtype)
    kc = jax.random.normal(ks[1], (b, k, s, h), dtype)
    vc = jax.random.normal(ks[2], (b, k, s, h), dtype)
    kn = jax.random.normal(ks[3], (b, t, k, h), dtype)
    vn = jax.random.normal(ks[4], (b, t, k, h), dtype)
    lengths = np.random.default_rng(s * 1000 + b).integers(s // 2, s + 1, size=b)
    if b > 1:
        lengths[0] = 0  # an empty row, as a freshly refilled slot has before its prefill lands
    return q, kc, vc, jnp.asarray(lengths, jnp.int32), kn, vn


def _time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma list of {', '.join(MODELS)} (default all; CPU: smollm2-135m)")
    p.add_argument("--ops", default="verify,draft")
    p.add_argument("--batches", default=None, help="comma list (default 1,8,64; CPU: 1,4)")
    p.add_argument("--contexts", default=None, help="cache capacities S (default 512,2048,8192; CPU: 256,512)")
    p.add_argument("--blocks", default="8,16", help="block sizes T")
    p.add_argument("--block-s", default="512", help="kernel cache tile(s) to try, comma list")
    p.add_argument("--block-kv-heads", default="all", help="kv heads per grid step: all or an int")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point (default 20; CPU: 3)")
    p.add_argument("--quick", action="store_true", help="batches 1,64; contexts 512,8192; T=16")
    p.add_argument("--no-check", action="store_true", help="skip the kernel-vs-reference agreement check")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--interpret", action="store_true",
                   help="off TPU, also run the kernel in Pallas interpret mode (tests this script; "
                        "its times mean nothing)")
    a = p.parse_args(argv)

    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    on_tpu = backend == "tpu"
    kernel_impl = "pallas" if on_tpu else ("interpret" if a.interpret else None)
    if backend == "cpu":
        print("No accelerator (JAX backend: cpu). The Pallas kernels target TPU; timing only the "
              "jnp reference, at small sizes.")
        batches, contexts, repeats = [1, 4], [256, 512], 3
    else:
        batches, contexts, repeats = [1, 8, 64], [512, 2048, 8192], 20
        if not on_tpu:
            print(f"Backend {backend} ({device}): the kernels are Mosaic TPU kernels and do not run here; "
                  "timing only the jnp reference (what dispatch picks on this backend).")
    if a.quick:
        batches, contexts, blocks = [1, 64], [512, 8192], [16]
    else:
        blocks = _ints(a.blocks)
    batches = _ints(a.batches) if a.batches else batches
    contexts = _ints(a.contexts) if a.contexts else contexts
    repeats = a.repeats or repeats
    dtype = jnp.dtype(a.dtype)
    block_s_list = _ints(a.block_s)
    kvh = None if a.block_kv_heads == "all" else int(a.block_kv_heads)
    models = (a.models or ("smollm2-135m" if backend == "cpu" else ",".join(MODELS))).split(",")

    print(f"device: {device} ({backend}); dtype {dtype.name}; median of {repeats} calls")
    head = f"{'op':6} {'model':13} {'B':>3} {'S':>5} {'T':>3} {'ref ms':>9} {'ref GB/s':>9}"
    if kernel_impl:
        head += f" {'block_s':>7} {'kern ms':>9} {'kern GB/s':>9} {'speedup':>7} {'max|d|':>8}"
    print(head)
    rows = []
    key = jax.random.PRNGKey(0)
    for op in a.ops.split(","):
        fn, ref, sizes = OPS[op]
        ref_jit = jax.jit(ref)
        for model in models:
            k, g, h = MODELS[model]
            for b in batches:
                for s in contexts:
                    for t in blocks:
                        args = _inputs(key, b, t, k, g, h, s, dtype)
                        valid_bytes = 2 * int(args[3].sum()) * k * h * dtype.itemsize
                        ref_s = _time(ref_jit, args, repeats)
                        row = dict(op=op, model=model, batch=b, context=s, block=t, dtype=dtype.name,
                                   device=device, ref_ms=ref_s * 1e3, ref_gbps=valid_bytes / ref_s / 1e9)
                        line = (f"{op:6} {model:13} {b:>3} {s:>5} {t:>3} {ref_s * 1e3:>9.3f} "
                                f"{valid_bytes / ref_s / 1e9:>9.1f}")
                        if kernel_impl is None:
                            rows.append(row)
                            print(line, flush=True)
                            continue
                        for bs in block_s_list:
                            kern = jax.jit(lambda *x, bs=bs: fn(*x, block_sizes=sizes(block_s=bs, block_kv_heads=kvh),
                                                                impl=kernel_impl))
                            kern_s = _time(kern, args, repeats)
                            diff = float("nan")
                            if not a.no_check:
                                diff = float(jnp.max(jnp.abs(kern(*args).astype(jnp.float32)
                                                             - ref_jit(*args).astype(jnp.float32))))
                            rows.append(dict(row, impl=kernel_impl, block_s=bs, block_kv_heads=kvh,
                                             kernel_ms=kern_s * 1e3, kernel_gbps=valid_bytes / kern_s / 1e9,
                                             speedup=ref_s / kern_s, max_abs_diff=diff))
                            print(f"{line} {bs:>7} {kern_s * 1e3:>9.3f} {valid_bytes / kern_s / 1e9:>9.1f} "
                                  f"{ref_s / kern_s:>7.2f} {diff:>8.1e}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
