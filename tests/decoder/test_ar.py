"""Autoregressive decoding: the lossless reference every other mode is compared with."""

from __future__ import annotations

import numpy as np
import pytest

from compile_counter import count_compiles
from dflash_batch.decoder import Request
from decoding import make_decoder

torch = pytest.importorskip("torch")


class CharTokenizer:
    """Detokenizes id i as one letter, enough to exercise stop strings on a tiny model."""

    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids if not (skip_special_tokens and i == 2))


def _prompts(n, vocab, seed=0, lo=3, hi=40):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, vocab, size=int(rng.integers(lo, hi)))) for _ in range(n)]


@pytest.fixture(scope="module")
def decoder3(tiny_llama):
    return make_decoder(tiny_llama, batch_size=3, max_new_tokens=24, prompt_buckets=(16, 64), prefill_chunk=16)


def _hf_greedy(folder, prompt, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    return [int(t) for t in out[0, len(prompt):]]


def test_greedy_equals_transformers_generate(tiny_llama, tiny_llama_dir, decoder3):
    prompts = _prompts(4, tiny_llama.config.vocab_size, seed=5)
    reqs = [Request(id=str(i), token_ids=p, max_new_tokens=20) for i, p in enumerate(prompts)]
    got = {r.id: r for r in decoder3.generate(reqs)}
    for i, p in enumerate(prompts):
        want = _hf_greedy(tiny_llama_dir, p, 20)
        assert got[str(i)].token_ids == want, f"row {i}"
        assert got[str(i)].finish_reason == ("eos" if want[-1] == 2 else "length")


def test_rows_do_not_depend_on_batch_or_refill(tiny_llama, decoder3):
    """Seven requests through three slots (refilled as rows finish) equal one-at-a-time decoding."""
    prompts = _prompts(7, tiny_llama.config.vocab_size, seed=1, hi=60)
    budgets = [24, 3, 17, 1, 9, 24, 5]
    reqs = [Request(id=str(i), token_ids=p, max_new_tokens=m) for i, (p, m) in enumerate(zip(prompts, budgets))]
    batched = {r.id: r.token_ids for r in decoder3.generate(reqs)}
    single = make_decoder(tiny_llama, batch_size=1, max_new_tokens=24, prompt_buckets=(16, 64))
    alone = {r.id: r.token_ids for r in single.generate(reqs)}
    assert batched == alone
    for i, m in enumerate(budgets):
        assert 1 <= len(batched[str(i)]) <= m


def test_a_batch_run_driven_step_by_step_gives_generates_results(tiny_llama, decoder3):
    """``start`` hands out the loop's named steps: ``refill`` (here one prompt at a time, as the
    bench takes turns), ``decode`` and ``harvest`` give what ``generate`` gives."""
    prompts = _prompts(5, tiny_llama.config.vocab_size, seed=4)
    reqs = [Request(id=str(i), token_ids=p, max_new_tokens=m)
            for i, (p, m) in enumerate(zip(prompts, [24, 3, 20, 9, 1]))]
    plain = {r.id: r.token_ids for r in decoder3.generate(reqs)}
    batch, got, prefills, calls = decoder3.start(reqs), {}, 0, 0
    while True:
        while batch.refill(limit=1):
            prefills += 1
        if not batch.busy:
            break
        batch.decode()
        calls += 1
        got.update({r.id: r.token_ids for r in batch.harvest()})
    assert got == plain
    assert prefills == len(reqs) and calls >= 2
    assert batch.refill() == 0 and not batch.busy


def test_no_recompilation_after_warmup(tiny_llama, decoder3):
    decoder3.warmup(16)
    decoder3.warmup(64)
    reqs = [Request(id=str(i), token_ids=p, max_new_tokens=1 + i % 7, temperature=0.7 * (i % 2), seed=i)
            for i, p in enumerate(_prompts(9, tiny_llama.config.vocab_size, seed=2, hi=60))]
    with count_compiles() as compiles:
        results = list(decoder3.generate(reqs))
    assert len(results) == 9
    assert compiles() == 0


def test_sampling_is_reproducible_per_seed_and_varies_across_seeds(tiny_llama, decoder3):
    p = _prompts(1, tiny_llama.config.vocab_size, seed=3)[0]
    reqs = [Request(id=f"{s}-{k}", token_ids=p, max_new_tokens=12, temperature=1.0, seed=s)
            for s in range(6) for k in range(2)]
    out = {r.id: r.token_ids for r in decoder3.generate(reqs)}
    for s in range(6):
        assert out[f"{s}-0"] == out[f"{s}-1"]
    assert len({tuple(out[f"{s}-0"]) for s in range(6)}) > 1


@pytest.mark.slow
def test_first_token_sampling_follows_softmax(tiny_llama):
    """The sampled first-token frequencies match softmax(logits / T) (chi-square, 2000 draws)."""
    from scipy import stats

    import jax.numpy as jnp

    from dflash_batch.decoder import KVCache, forward

    cfg = tiny_llama.config
    p = _prompts(1, cfg.vocab_size, seed=4)[0]
    start = jnp.zeros((1,), jnp.int32)
    logits, _, _ = forward(tiny_llama.params, cfg, jnp.asarray([p]), start, KVCache.init(cfg, 1, 64))
    probs = jax_softmax(np.asarray(logits[0, -1], np.float64) / 1.5)
    dec = make_decoder(tiny_llama, batch_size=8, max_new_tokens=1, prompt_buckets=(64,))
    n = 2000
    reqs = [Request(id=str(s), token_ids=p, max_new_tokens=1, temperature=1.5, seed=s) for s in range(n)]
    counts = np.bincount([r.token_ids[0] for r in dec.generate(reqs)], minlength=cfg.vocab_size)
    keep = probs * n >= 5
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(probs[keep], probs[~keep].sum())
    expected = expected / expected.sum() * n
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def jax_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_top_p_never_samples_outside_the_nucleus(tiny_llama):
    import jax.numpy as jnp

    from dflash_batch.decoder._sampling import nucleus_filter

    logits = jnp.log(jnp.asarray([[[0.5, 0.3, 0.15, 0.05]]]))
    kept = np.isfinite(np.asarray(nucleus_filter(logits, jnp.asarray([0.7]))))[0, 0]
    assert kept.tolist() == [True, True, False, False]
    kept = np.isfinite(np.asarray(nucleus_filter(logits, jnp.asarray([0.1]))))[0, 0]
    assert kept.tolist() == [True, False, False, False]


def test_stop_string_ends_the_row_and_trims_text(tiny_llama):
    dec = make_decoder(tiny_llama, batch_size=2, max_new_tokens=24, prompt_buckets=(64,))
    dec.target = type(tiny_llama)(**{**tiny_llama.__dict__, "tokenizer": CharTokenizer()})
    prompts = _prompts(8, tiny_llama.config.vocab_size, seed=6)
    frees = {r.id: r for r in dec.generate([Request(id=str(i), token_ids=p, max_new_tokens=24)
                                            for i, p in enumerate(prompts)])}
    free = max(frees.values(), key=lambda r: len(r.text))
    p = prompts[int(free.id)]
    assert free.finish_reason in ("length", "eos") and len(free.text) >= 6
    stop = free.text[2:4]
    cut = next(iter(dec.generate([Request(id="b", token_ids=p, max_new_tokens=24, stop=(stop,))])))
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(free.token_ids)
