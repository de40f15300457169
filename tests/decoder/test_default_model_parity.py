"""Our JAX AR greedy decode of the default model equals transformers' greedy ``generate``.

Four ACLSum test abstracts go through the ``summarize`` chat prompt of the embedded
SmolLM2-135M-Instruct, 128 new tokens each. Ours runs all four in one static batch of 4
slots (so padded prompts of different lengths share the batch); transformers runs each
prompt alone at batch 1 (no padding at all), fp32, and is the reference. Four rows are
enough for what is claimed: their prompts differ in length (padding shares a batch), and
at 128 new tokens rows end both ways, at EOS and at the token budget.

Float32 sums run in a different order in XLA and in PyTorch, so two greedy decoders can
part ways where the top two logits are all but tied. A row that differs therefore passes
only when, at the first differing position, transformers' own logits put our token within
``NEAR_TIE`` of its pick (so the top-2 gap is under ``NEAR_TIE`` too). And at least
``MIN_IDENTICAL`` rows must match exactly, so that escape cannot hide a real bug.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from decoding import make_decoder

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.slow, pytest.mark.minutes]

MODEL = "smollm2-135m-instruct"
N_ROWS = 4
MAX_NEW_TOKENS = 128
NEAR_TIE = 1e-4
MIN_IDENTICAL = 3


@dataclasses.dataclass
class Reference:
    """transformers' greedy completion of one prompt and the raw logits behind each token."""

    token_ids: list[int]  # new tokens, up to and including the first EOS
    logits: np.ndarray  # [len(token_ids), V] float32: logits[k] chose token_ids[k]


@dataclasses.dataclass
class Comparison:
    row_id: str
    ours: list[int]
    theirs: list[int]
    finish_reason: str
    diverge_at: int | None  # first differing position; None when one list is a prefix of the other
    top2_gap: float | None = None  # transformers' top-1 minus top-2 logit at diverge_at
    our_deficit: float | None = None  # transformers' logit of its pick minus that of ours at diverge_at

    @property
    def identical(self) -> bool:
        return self.ours == self.theirs


@pytest.fixture(scope="module")
def target():
    from dflash_batch.decoder import load_target

    return load_target(MODEL)


@pytest.fixture(scope="module")
def prompts(target) -> dict[str, list[int]]:
    from dflash_batch.decoder import render_messages
    from dflash_batch.jobs._datasets import aclsum_abstracts
    from dflash_batch.decoder import summarize_messages

    rows = aclsum_abstracts("test")[:N_ROWS]
    assert len(rows) == N_ROWS and len({r["id"] for r in rows}) == N_ROWS
    out = {r["id"]: render_messages(target.tokenizer, summarize_messages(r["document"])) for r in rows}
    for row_id, ids in out.items():
        text = target.tokenizer.decode(ids)
        assert "Summarize" in text and text.endswith("<|im_start|>assistant\n"), (row_id, text[-200:])
    return out


@pytest.fixture(scope="module")
def ours(target, prompts):
    """Our completions, all rows in one batch of as many slots, keyed by row id."""
    from dflash_batch.decoder import Request

    decoder = make_decoder(target, batch_size=N_ROWS, max_new_tokens=MAX_NEW_TOKENS)
    bucket = decoder.bucket(max(len(p) for p in prompts.values()))
    requests = [Request(id=i, token_ids=p, max_new_tokens=MAX_NEW_TOKENS) for i, p in prompts.items()]
    results = {r.id: r for r in decoder.generate(requests, bucket=bucket)}
    assert sorted(results) == sorted(prompts), "the decoder lost or invented rows"
    return results


@pytest.fixture(scope="module")
def theirs(target, prompts) -> dict[str, Reference]:
    """transformers' greedy completions, one prompt at a time, keyed by row id."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target.path), dtype=torch.float32).eval()
    eos = list(target.eos_token_ids)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    out = {}
    try:
        for row_id, ids in prompts.items():
            input_ids = torch.tensor([ids])
            with torch.no_grad():
                gen = model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=MAX_NEW_TOKENS,
                    do_sample=False, eos_token_id=eos, pad_token_id=eos[0],
                    output_logits=True, return_dict_in_generate=True)
            new = gen.sequences[0, len(ids):].tolist()
            # Stop at the first EOS, keeping it (as ours does); anything after would be padding.
            end = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))
            logits = torch.cat(gen.logits[:end]).float().numpy()
            assert logits.shape[0] == end, (row_id, logits.shape, end)
            # The logits are the raw ones greedy picked from (the checkpoint sets no processors).
            assert logits.argmax(-1).tolist() == new[:end], f"{row_id}: transformers' logits disagree with its tokens"
            out[row_id] = Reference(token_ids=new[:end], logits=logits)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def comparisons(prompts, ours, theirs) -> list[Comparison]:
    rows = []
    for row_id in prompts:
        a, ref = ours[row_id].token_ids, theirs[row_id]
        b = ref.token_ids
        k = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        c = Comparison(row_id, a, b, ours[row_id].finish_reason, k)
        if k is not None:
            top2 = np.sort(ref.logits[k])[-2:]
            c.top2_gap = float(top2[1] - top2[0])
            c.our_deficit = float(ref.logits[k, b[k]] - ref.logits[k, a[k]])
        rows.append(c)
    return rows


def _describe(c: Comparison, tokenizer) -> str:
    if c.diverge_at is None:
        return (f"row {c.row_id}: ours has {len(c.ours)} tokens ({c.finish_reason}), transformers "
                f"{len(c.theirs)}, with no differing token before the shorter one ends")
    k = c.diverge_at
    context = tokenizer.decode(c.theirs[max(0, k - 12):k])
    return (f"row {c.row_id}: first divergence at new-token position {k}: transformers picked "
            f"{c.theirs[k]} {tokenizer.decode([c.theirs[k]])!r}, ours {c.ours[k]} {tokenizer.decode([c.ours[k]])!r} "
            f"after ...{context!r}; transformers' top-2 logit gap there = {c.top2_gap:.3g}, "
            f"its logit of our token is {c.our_deficit:.3g} below its pick (near-tie bound {NEAR_TIE:g})")


def test_every_divergence_is_a_near_tie(comparisons, target):
    """Rows may part only where transformers itself sees a near-tie between its pick and ours."""
    bad = [c for c in comparisons if not c.identical
           and (c.diverge_at is None or not (c.our_deficit < NEAR_TIE and c.top2_gap < NEAR_TIE))]
    assert not bad, "divergences that are not near-ties:\n" + "\n".join(_describe(c, target.tokenizer) for c in bad)


def test_most_rows_are_identical(comparisons, target):
    same = [c for c in comparisons if c.identical]
    differing = "\n".join(_describe(c, target.tokenizer) for c in comparisons if not c.identical)
    assert len(same) >= MIN_IDENTICAL, (
        f"only {len(same)} of {len(comparisons)} rows equal transformers token for token "
        f"(need {MIN_IDENTICAL}):\n{differing}")


def test_identical_rows_finish_for_the_same_reason(comparisons, target):
    """A matching row ends in EOS exactly when transformers' does, else at the token budget."""
    eos = set(target.eos_token_ids)
    ends = {"eos" if c.theirs and c.theirs[-1] in eos else "length" for c in comparisons}
    assert ends == {"eos", "length"}, f"the rows should end both ways, at EOS and at the budget: {ends}"
    for c in comparisons:
        if not c.identical:
            continue
        want = "eos" if c.theirs and c.theirs[-1] in eos else "length"
        assert c.finish_reason == want, (c.row_id, c.finish_reason, want, len(c.ours))
        if want == "length":
            assert len(c.ours) == MAX_NEW_TOKENS, (c.row_id, len(c.ours))
