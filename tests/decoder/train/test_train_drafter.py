"""End to end on a tiny random target: training raises tau, and the result is a z-lab drafter."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from tiny_training import N_HELD_OUT, SPEC, tiny_prompts

from dflash_batch.decoder._drafter_checkpoint import load_drafter
from dflash_batch.decoder.train import decode_tau, split_prompts

# Every test here reads one tiny training run (about 20 s to make): the file is slow as a whole.
pytestmark = pytest.mark.slow


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
    drafter = load_drafter(out)
    params = drafter.params
    eos = tiny32.eos_token_ids[0]
    assert eos in np.asarray(params["d2t"]).tolist()  # the drafter can always propose the end
    prompts = tiny_prompts()
    _, held = split_prompts([p[0] for p in prompts], N_HELD_OUT, seed=0)
    r = decode_tau(tiny32, [prompts[i] for i in held], drafter=drafter, max_new_tokens=32)
    # bf16 weights on disk: close to the fp32 evaluation during training
    assert abs(r["tau"] - summary["evals"][-1]["decoder_tau"]) < 0.15


def test_shipped_drafter_is_the_evaluated_one_with_the_best_held_out_tau(tiny_run):
    summary, out, work = tiny_run
    trained = [e for e in summary["evals"] if e["step"] > 0]
    best = max(trained, key=lambda e: (e["decoder_tau"], e["step"]))
    assert summary["exported_step"] == best["step"]
    rec = json.loads((work / "drafter-best" / "best.json").read_text())
    assert (rec["step"], rec["decoder_tau"]) == (best["step"], best["decoder_tau"])
    kept = load_drafter(work / "drafter-best").params
    shipped = load_drafter(out).params
    np.testing.assert_allclose(np.asarray(shipped["fc"]), np.asarray(kept["fc"]).astype(np.float32), rtol=1e-2, atol=1e-6)


def test_best_drafter_keeps_the_higher_tau_and_ignores_another_runs(tiny_run, tmp_path):
    from dflash_batch.decoder.train._best import BestDrafter

    _, out, _ = tiny_run
    loaded = load_drafter(out)
    dcfg, params = loaded.config, loaded.params
    best = BestDrafter(tmp_path / "best", "run-a")
    assert best.load() is None
    assert best.offer(100, 2.0, dcfg, params)
    assert not best.offer(200, 1.5, dcfg, params)  # worse: the step-100 drafter stays
    assert best.load()[0] == 100
    assert best.offer(300, 2.0, dcfg, params)  # a tie goes to the later step
    assert best.load()[0] == 300
    assert BestDrafter(tmp_path / "best", "run-b").load() is None  # another run's best is not ours


def _card_tool():
    """tools/model_card.py: the card is research tooling beside the package, not part of it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "tools" / "model_card.py"
    spec = importlib.util.spec_from_file_location("model_card", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_card_and_tau_plot_describe_the_run(tiny_run, tmp_path):
    tool = _card_tool()
    model_card, plot_tau_curve = tool.model_card, tool.plot_tau_curve
    summary, out, _ = tiny_run
    written = json.loads((out / "training_summary.json").read_text())  # what train-drafter leaves for the card
    assert written["exported_step"] == summary["exported_step"] and written["evals"] == summary["evals"]
    card = model_card(summary, data_note="random prompts", shape_note="tiny")
    assert f"the step-{summary['exported_step']} drafter" in card and "random prompts" in card
    rows = [line for line in card.splitlines() if line.startswith("| 200 |")]
    assert len(rows) == 1 and f"{summary['evals'][-1]['decoder_tau']:.3f}" in rows[0]
    test = {"prompts": 4, "max_new_tokens": 32, "source": "t.parquet", "dflash_b16": {"tau": 1.3, "tau_mean": 1.3},
            "ngram_b16": {"tau": 2.1, "tau_mean": 2.4}}
    assert "1.30 vs 2.10, so this drafter does NOT beat it" in model_card({**summary, "test": test})
    assert f"target top-{summary['train_config']['top_k']} distribution" in card
    full = {**summary, "train_config": {**summary["train_config"], "teacher": "full"}}
    assert "the target's full distribution over the draft vocabulary (KL)" in model_card(full)
    png = plot_tau_curve(summary["evals"], tmp_path / "tau.png", 8)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert plot_tau_curve(summary["evals"][:1], tmp_path / "one.png", 8) is None  # one point is no curve


def test_continued_params_export_back_to_the_saved_drafter(tiny_run):
    from dflash_batch.decoder.train._init import export_params, params_from_drafter

    _, out, _ = tiny_run
    saved = load_drafter(out).params
    inv_scale = np.random.default_rng(0).uniform(0.5, 4.0, size=(saved["fc"].shape[0] // saved["fc"].shape[1],
                                                                 saved["fc"].shape[1])).astype(np.float32)
    train = params_from_drafter(saved, inv_scale)
    assert not np.allclose(np.asarray(train["fc"]), np.asarray(saved["fc"]))  # training sees standardised features
    back = export_params(train, inv_scale)

    def same(path, want, got):
        assert got.dtype == want.dtype, path
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7, err_msg=str(path))

    jax.tree_util.tree_map_with_path(same, saved, back)  # also fails if the two trees' structures differ


def test_training_continues_a_saved_drafter(tiny32, tiny_run, tmp_path):
    """--init-from: the run starts from the saved drafter (its held-out tau, shape and draft
    vocabulary), not from the target, and fine-tunes it on the data it is given."""
    import dataclasses
    import shutil

    from dflash_batch.decoder.train import DataConfig, DrafterSpec, train_drafter
    from tiny_training import TRAIN

    summary, out, work = tiny_run
    cont_work = tmp_path / "work"
    cont_work.mkdir()
    shutil.copy(work / "responses.jsonl", cont_work)  # the same data: nothing generated again
    shutil.copytree(work / "features", cont_work / "features")
    spec = DrafterSpec(num_layers=2, block_size=4, draft_vocab_size=16, init_drafter=str(out))  # the drafter's win
    tcfg = dataclasses.replace(TRAIN, steps=20, eval_every=20, lr=3e-4)
    data = DataConfig(max_new_tokens=32, eval_prompts=N_HELD_OUT, eval_max_new_tokens=32)
    cont = train_drafter(tiny32, tiny_prompts(), tmp_path / "continued", work_dir=cont_work, spec=spec, tcfg=tcfg,
                         data=data, progress=False, log=lambda _: None)
    base, tuned = load_drafter(out), load_drafter(tmp_path / "continued")
    assert tuned.config == base.config
    np.testing.assert_array_equal(np.asarray(tuned.params["d2t"]), np.asarray(base.params["d2t"]))
    assert not np.allclose(np.asarray(tuned.params["fc"]), np.asarray(base.params["fc"]))  # it was trained

    prompts = tiny_prompts()
    _, held = split_prompts([p[0] for p in prompts], N_HELD_OUT, seed=0)
    saved_tau = decode_tau(tiny32, [prompts[i] for i in held], drafter=base, max_new_tokens=32)["tau"]
    start, end = cont["evals"][0], cont["evals"][-1]
    assert (start["step"], end["step"]) == (0, 20)
    assert abs(start["decoder_tau"] - saved_tau) < 0.02  # step 0 is the saved drafter itself
    assert start["decoder_tau"] > summary["evals"][0]["decoder_tau"] + 0.25  # not an untrained start

    card = _card_tool().model_card(cont)
    assert f"continued from the drafter `{out}`" in card and "the drafter it continued: tau" in card
