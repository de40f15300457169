"""End to end on a tiny random target: training raises tau, and the result is a z-lab drafter."""

from __future__ import annotations

import json

import numpy as np
from tiny_training import N_HELD_OUT, SPEC, tiny_prompts

from dflash_batch.decoder._drafter import load_drafter
from dflash_batch.decoder.train import decode_tau, split_prompts


def test_training_raises_decoder_tau_on_held_out_prompts(tiny_run):
    summary, _, _ = tiny_run
    untrained, trained = summary["evals"][0], summary["evals"][-1]
    assert (untrained["step"], trained["step"]) == (0, 200)
    # Real Decoder, dflash mode, greedy, on prompts never trained on.
    assert untrained["decoder_tau"] < 1.15
    assert trained["decoder_tau"] > untrained["decoder_tau"] + 0.25, summary["evals"]
    assert trained["heldout_acc1"] > 2 * untrained["heldout_acc1"]


def test_saved_drafter_is_zlab_format_with_its_extensions_and_decodes(tiny32, tiny_run):
    summary, out, _ = tiny_run
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["DFlashDraftModel"] and hf["torch_dtype"] == "bfloat16"
    assert hf["dflash_config"]["mask_embedding"] is True
    assert hf["dflash_config"]["draft_vocab_size"] == SPEC.draft_vocab_size
    dcfg, params = load_drafter(out)
    eos = tiny32.eos_token_ids[0]
    assert eos in np.asarray(params["d2t"]).tolist()  # the drafter can always propose the end
    prompts = tiny_prompts()
    _, held = split_prompts([p[0] for p in prompts], N_HELD_OUT, seed=0)
    r = decode_tau(tiny32, [prompts[i] for i in held], drafter=(dcfg, params), max_new_tokens=32)
    # bf16 weights on disk: close to the fp32 evaluation during training
    assert abs(r["tau"] - summary["evals"][-1]["decoder_tau"]) < 0.15
