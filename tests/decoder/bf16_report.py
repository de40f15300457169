"""What bfloat16 does to the default model's outputs, on ACLSum summarization prompts.

Run: ``python -P tests/decoder/bf16_report.py [N_PROMPTS] [MAX_NEW_TOKENS]`` (not a test: it
loads SmolLM2 twice and decodes for minutes). It prints
  * bf16 dflash / ngram / hybrid against bf16 ar: rows identical / rows, and for each
    mismatch the target's logit margin (top-1 minus top-2) at the first divergent token,
    in bf16, from a fresh pass over the row's prompt and common prefix;
  * bf16 ar against float32 ar: rows identical / rows and the mean common-prefix length.
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np

from dflash_batch.decoder import DecodeConfig, Decoder, Request, load_drafter, load_target, resolve_drafter_dir
from dflash_batch.decoder._cache import KVCache
from dflash_batch.decoder._prompts import render_messages
from dflash_batch.decoder._target import forward
from dflash_batch.jobs._datasets import aclsum_abstracts
from dflash_batch.decoder import summarize_messages

MODEL = "smollm2-135m-instruct"


def requests(tokenizer, n: int, new: int) -> list[Request]:
    rows = aclsum_abstracts("test")[:n]
    return [Request(id=r["id"], token_ids=render_messages(tokenizer, summarize_messages(r["document"])),
                    max_new_tokens=new) for r in rows]


def generate(target, reqs, new, mode="ar", drafter=None, batch_size=4) -> dict[str, list[int]]:
    cfg = DecodeConfig(mode=mode, batch_size=batch_size, max_new_tokens=new, prompt_buckets=(512,),
                       block_size=8 if mode != "ar" else "auto")
    return {r.id: r.token_ids for r in Decoder(target, cfg, drafter).generate(reqs)}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def margin_at(target, prompt: list[int], prefix: list[int]) -> float:
    """top-1 minus top-2 logit of the target's next token after prompt + prefix."""
    seq = jnp.asarray([prompt + prefix], jnp.int32)
    logits, _, _ = forward(target.params, target.config, seq, jnp.zeros((1,), jnp.int32),
                           KVCache.init(target.config, 1, seq.shape[1]), logits_at=jnp.asarray([seq.shape[1] - 1]))
    top2 = np.sort(np.asarray(logits[0, 0], np.float32))[-2:]
    return float(top2[1] - top2[0])


def main(n: int = 16, new: int = 96) -> None:
    bf16 = load_target(MODEL, dtype="bfloat16")
    drafter = load_drafter(resolve_drafter_dir("default", MODEL), dtype="bfloat16")
    reqs = requests(bf16.tokenizer, n, new)
    prompts = {r.id: r.token_ids for r in reqs}
    ar = generate(bf16, reqs, new, batch_size=16)
    print(f"{n} ACLSum test prompts, {new} new tokens, greedy")
    for mode in ("dflash", "ngram", "hybrid"):
        got = generate(bf16, reqs, new, mode, drafter if mode != "ngram" else None)
        same = sum(got[k] == ar[k] for k in ar)
        print(f"bf16 {mode} vs bf16 ar (batch 4 vs 16): {same}/{len(ar)} rows identical")
        for k in ar:
            if got[k] != ar[k]:
                c = common_prefix(got[k], ar[k])
                print(f"  {k}: first divergence at token {c}, margin {margin_at(bf16, prompts[k], ar[k][:c]):.4f}")
    del drafter
    f32 = load_target(MODEL, dtype="float32")
    ref = generate(f32, reqs, new, batch_size=16)
    same = sum(ref[k] == ar[k] for k in ar)
    prefix = np.mean([common_prefix(ref[k], ar[k]) for k in ar])
    lens = np.mean([len(ar[k]) for k in ar])
    print(f"bf16 ar vs float32 ar: {same}/{len(ar)} rows identical, mean common prefix {prefix:.1f} "
          f"of {lens:.1f} tokens")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
