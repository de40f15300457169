"""The DFlash drafter: z-lab checkpoint round trip and a forward pass checked against
an independent numpy implementation written from the paper's description."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from dflash_batch.decoder._drafter_checkpoint import init_drafter_params, load_drafter, save_drafter
from dflash_batch.decoder._drafter_config import DrafterConfig
from dflash_batch.decoder._drafter import context_kv, draft_block, draft_to_target_ids

MASK = 3
BLOCK = 4
_context_kv_rows = jax.jit(context_kv, static_argnums=1)


def _context_kv(dparams, dcfg, feats, positions):
    """Context K/V in the cache layout draft_block reads, [Ld, B, K, S, H]."""
    k, v = _context_kv_rows(dparams, dcfg, feats, positions)  # [Ld, B, S, K, H]
    return jnp.moveaxis(k, 2, 3), jnp.moveaxis(v, 2, 3)
_draft_block = jax.jit(draft_block, static_argnums=(1, 3))


def _zlab_config(target_cfg, **dflash_extra) -> dict:
    """A tiny drafter config.json as z-lab writes it, sized for the tiny target."""
    return {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "block_size": BLOCK,
        "dflash_config": {"mask_token_id": MASK, "target_layer_ids": [0, 2], **dflash_extra},
        "num_hidden_layers": 2, "num_target_layers": target_cfg.num_layers,
        "hidden_size": target_cfg.hidden_size, "intermediate_size": 80,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rope_theta": 1000.0, "rms_norm_eps": 1e-6, "vocab_size": target_cfg.vocab_size,
        "attention_bias": False, "tie_word_embeddings": False,
    }


def _make_drafter(folder, target_cfg, seed=0, **dflash_extra):
    """Random drafter saved in z-lab format; returns (folder, loaded cfg, loaded params)."""
    cfg = DrafterConfig.from_hf(_zlab_config(target_cfg, **dflash_extra))
    d2t = None
    if cfg.draft_vocab_size:
        d2t = np.sort(np.random.default_rng(seed).choice(cfg.vocab_size, cfg.draft_vocab_size, replace=False))
    params = init_drafter_params(cfg, jax.random.PRNGKey(seed), d2t=d2t, scale=0.15)
    # Jitter every weight (norms included) so a swapped or transposed tensor cannot pass.
    rng = np.random.default_rng(seed + 1)
    params = jax.tree.map(
        lambda a: a if a.dtype == jnp.int32 else a * rng.uniform(0.8, 1.2, a.shape).astype(np.float32), params)
    save_drafter(folder, cfg, params, dtype=jnp.float32)
    loaded = load_drafter(folder)
    return folder, loaded.config, loaded.params


# --- independent reference: numpy, float64, explicit loops and masks ----------------------


def _reference(dfolder, tfolder, feats, ctx_pos, ctx_len, tokens, start):
    """Draft logits [B, L-1, V or V_d] straight from the raw safetensors and config.json."""
    dt = {k: v.astype(np.float64) for k, v in load_file(str(dfolder / "model.safetensors")).items()}
    tt = {k: v.astype(np.float64) for k, v in load_file(str(tfolder / "model.safetensors")).items()}
    c = json.loads((dfolder / "config.json").read_text())
    n_heads, n_kv, hd, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
    mask_id = c["dflash_config"]["mask_token_id"]
    emb = tt["model.embed_tokens.weight"]
    head = dt["lm_head.weight"] if "lm_head.weight" in dt else tt.get("lm_head.weight", emb)
    inv = 1.0 / c["rope_theta"] ** (np.arange(hd // 2) * 2.0 / hd)

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

    def rope(x, pos):  # one head vector, rotate-half convention
        cos, sin = np.cos(pos * inv), np.sin(pos * inv)
        x1, x2 = x[: hd // 2], x[hd // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin])

    b_n, s_n = feats.shape[:2]
    blk = tokens.shape[1]
    out = []
    for b in range(b_n):
        ctx = rms(feats[b].reshape(s_n, -1) @ dt["fc.weight"].T, dt["hidden_norm.weight"])  # all S rows, masked below
        h = np.stack([dt["mask_embedding"] if ("mask_embedding" in dt and t > 0 and tokens[b, t] == mask_id)
                      else emb[tokens[b, t]] for t in range(blk)])
        key_pos = np.concatenate([ctx_pos[b], start[b] + np.arange(blk)])
        allowed = np.concatenate([np.arange(s_n) < ctx_len[b], np.ones(blk, bool)])  # no causal mask
        for i in range(c["num_hidden_layers"]):
            w = lambda n: dt[f"layers.{i}.{n}.weight"]
            x = rms(h, w("input_layernorm"))
            src = np.concatenate([ctx, x])  # context rows project with the same k/v weights
            q = (x @ w("self_attn.q_proj").T).reshape(blk, n_heads, hd)
            k = (src @ w("self_attn.k_proj").T).reshape(-1, n_kv, hd)
            v = (src @ w("self_attn.v_proj").T).reshape(-1, n_kv, hd)
            att = np.zeros((blk, n_heads, hd))
            for hq in range(n_heads):
                kv = hq // (n_heads // n_kv)
                for t in range(blk):
                    qv = rope(rms(q[t, hq], w("self_attn.q_norm")), start[b] + t)
                    scores = np.array([rope(rms(k[s, kv], w("self_attn.k_norm")), key_pos[s]) @ qv / np.sqrt(hd)
                                       for s in range(len(key_pos))])
                    scores = np.where(allowed, scores, -np.inf)
                    p = np.exp(scores - scores.max())
                    att[t, hq] = (p / p.sum()) @ v[:, kv]
            h = h + att.reshape(blk, -1) @ w("self_attn.o_proj").T
            x = rms(h, w("post_attention_layernorm"))
            g, u = x @ w("mlp.gate_proj").T, x @ w("mlp.up_proj").T
            h = h + (g / (1 + np.exp(-g)) * u) @ w("mlp.down_proj").T
        out.append(rms(h, dt["norm.weight"])[1:] @ head.T)
    return np.stack(out)


def _inputs(cfg, seed=0, s_n=9):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(2, s_n, cfg.num_features, cfg.hidden_size)).astype(np.float32)
    ctx_len = np.array([6, 9])
    feats[0, 6:] = 1e4  # rows past ctx_len must not matter
    ctx_pos = np.broadcast_to(np.arange(s_n), (2, s_n)).astype(np.int32)
    tokens = np.full((2, BLOCK), MASK, np.int32)
    tokens[:, 0] = [17, 42]  # anchors
    start = ctx_len.astype(np.int32)  # the anchor sits right after its row's context
    return feats, ctx_pos, ctx_len, tokens, start


def _ours(dparams, dcfg, target, feats, ctx_pos, ctx_len, tokens, start):
    k, v = _context_kv(dparams, dcfg, jnp.asarray(feats), jnp.asarray(ctx_pos))
    return np.asarray(_draft_block(dparams, dcfg, target.params, target.config, jnp.asarray(tokens),
                                   jnp.asarray(start), k, v, jnp.asarray(ctx_len)))


@pytest.mark.parametrize("extra", [{}, {"mask_embedding": True}, {"draft_vocab_size": 40}],
                         ids=["zlab", "mask_embedding", "reduced_vocab"])
def test_draft_block_matches_numpy_reference(extra, tiny_llama, tiny_llama_dir, tmp_path):
    folder, dcfg, dparams = _make_drafter(tmp_path, tiny_llama.config, **extra)
    args = _inputs(dcfg)
    ours = _ours(dparams, dcfg, tiny_llama, *args)
    assert ours.shape == (2, BLOCK - 1, dcfg.out_vocab_size)
    np.testing.assert_allclose(ours, _reference(folder, tiny_llama_dir, *args), atol=1e-4, rtol=1e-4)


def test_a_compacted_context_with_a_gap_matches_the_reference(tiny_llama, tiny_llama_dir, tmp_path):
    """The decoder stores context rows one after another, each at its token's own position
    (tokens an AR call committed have no row): the drafter sees exactly those tokens."""
    folder, dcfg, dparams = _make_drafter(tmp_path, tiny_llama.config)
    feats, _, ctx_len, tokens, _ = _inputs(dcfg)
    ctx_pos = np.array([[0, 1, 2, 7, 8, 9, 0, 0, 0], [0, 1, 2, 3, 4, 11, 12, 13, 14]], np.int32)  # gaps 3-6, 5-10
    start = np.array([10, 15], np.int32)  # each anchor after its row's newest token
    ours = _ours(dparams, dcfg, tiny_llama, feats, ctx_pos, ctx_len, tokens, start)
    np.testing.assert_allclose(ours, _reference(folder, tiny_llama_dir, feats, ctx_pos, ctx_len, tokens, start),
                               atol=1e-4, rtol=1e-4)
    # Positions, not storage order, are what the drafter sees: reversing the valid rows of
    # row 1 changes nothing.
    order = np.r_[8:-1:-1]
    again = _ours(dparams, dcfg, tiny_llama, feats[:, order], ctx_pos[:, order], ctx_len, tokens, start)
    np.testing.assert_allclose(again[1], ours[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"mask_embedding": True}, {"draft_vocab_size": 40}],
                         ids=["zlab", "mask_embedding", "reduced_vocab"])
def test_save_load_round_trips_in_zlab_format(extra, tiny_llama, tmp_path):
    _, cfg, params = _make_drafter(tmp_path / "a", tiny_llama.config, **extra)
    save_drafter(tmp_path / "b", cfg, params, dtype=jnp.float32)
    loaded = load_drafter(tmp_path / "b")
    cfg2, params2 = loaded.config, loaded.params
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    names = set(load_file(str(tmp_path / "b" / "model.safetensors")))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.1.self_attn.k_norm.weight",
            "layers.0.mlp.down_proj.weight"} <= names
    assert not any(n.startswith("model.") for n in names)
    assert ("mask_embedding" in names) == bool(extra.get("mask_embedding"))
    assert ("d2t" in names and "lm_head.weight" in names) == ("draft_vocab_size" in extra)
    if "draft_vocab_size" in extra:
        assert params2["lm_head"].shape == (cfg.hidden_size, 40)
        ids = draft_to_target_ids(params2, jnp.array([0, 39]))
        np.testing.assert_array_equal(ids, np.asarray(params2["d2t"])[[0, 39]])


def test_loading_refuses_a_non_dflash_architecture(tiny_llama, tmp_path):
    folder, _, _ = _make_drafter(tmp_path / "d", tiny_llama.config)
    bad = shutil.copytree(folder, tmp_path / "bad")
    hf = json.loads((bad / "config.json").read_text())
    hf["architectures"] = ["Qwen3ForCausalLM"]
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="Qwen3ForCausalLM"):
        load_drafter(bad)


def test_default_target_layer_ids_follow_zlab():
    hf = _zlab_config(type("T", (), dict(num_layers=36, hidden_size=64, vocab_size=128)))
    del hf["dflash_config"]["target_layer_ids"]
    hf["num_hidden_layers"] = 5
    assert DrafterConfig.from_hf(hf).target_layer_ids == (1, 9, 17, 25, 33)  # Qwen3-8B's published ids
    del hf["num_target_layers"]
    with pytest.raises(ValueError, match="num_target_layers"):
        DrafterConfig.from_hf(hf)


def test_context_rows_past_ctx_len_are_ignored(tiny_llama, tmp_path):
    _, dcfg, dparams = _make_drafter(tmp_path, tiny_llama.config)
    feats, ctx_pos, _, tokens, start = _inputs(dcfg)
    ctx_len = jnp.array([3, 7])  # a different valid length per row
    k, v = _context_kv(dparams, dcfg, jnp.asarray(feats), jnp.asarray(ctx_pos))
    dead = (jnp.arange(k.shape[3])[None, :] >= ctx_len[:, None])[None, :, None, :, None]  # [1, B, 1, S, 1]
    run = lambda k, v: np.asarray(_draft_block(dparams, dcfg, tiny_llama.params, tiny_llama.config,
                                               jnp.asarray(tokens), jnp.asarray(start), k, v, ctx_len))
    clean = run(k, v)
    poisoned = run(jnp.where(dead, 1e6, k), jnp.where(dead, -1e6, v))
    np.testing.assert_array_equal(clean, poisoned)


def test_one_context_row_reaches_every_block_position(tiny_llama, tmp_path):
    _, dcfg, dparams = _make_drafter(tmp_path, tiny_llama.config)
    feats, ctx_pos, ctx_len, tokens, start = _inputs(dcfg)
    base = _ours(dparams, dcfg, tiny_llama, feats, ctx_pos, ctx_len, tokens, start)
    feats2 = feats.copy()
    feats2[:, 0] += 1.0  # the very first context row of both sequences
    moved = _ours(dparams, dcfg, tiny_llama, feats2, ctx_pos, ctx_len, tokens, start)
    assert (np.abs(moved - base).max(axis=-1) > 1e-3).all()  # every (row, position)


def test_block_attention_is_not_causal(tiny_llama, tmp_path):
    """Position 1 sees the LAST block row: drafts are denoised jointly, not left to right."""
    _, dcfg, dparams = _make_drafter(tmp_path, tiny_llama.config)
    feats, ctx_pos, ctx_len, tokens, start = _inputs(dcfg)
    base = _ours(dparams, dcfg, tiny_llama, feats, ctx_pos, ctx_len, tokens, start)
    tokens2 = tokens.copy()
    tokens2[:, -1] = 99
    moved = _ours(dparams, dcfg, tiny_llama, feats, ctx_pos, ctx_len, tokens2, start)
    assert (np.abs(moved[:, 0] - base[:, 0]).max(axis=-1) > 1e-3).all()
