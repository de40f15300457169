"""The shapes of known models, so ``submit`` can plan a gs:// model's memory without reading it.

Each entry is the part of the model's published Hugging Face ``config.json`` that the memory
plan reads (sizes, layers, heads, vocabulary, tied embeddings; drafters add their DFlash block and
features). Values are copied from the config.json files of the Hugging Face repositories named
as keys (https://huggingface.co/<key>/blob/main/config.json), not derived. A model whose shape is
not here is planned from a local copy of its config.json (``[model] config``, ``--model-config``).

A gs:// folder matches an entry when its last path component is the repository's name
(``gs://b/models/Qwen3-8B`` -> ``Qwen/Qwen3-8B``), case-insensitively.
"""

from __future__ import annotations

from typing import Any


def _qwen3(hidden: int, layers: int, heads: int, inter: int, tied: bool) -> dict[str, Any]:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 8, "head_dim": 128,
            "intermediate_size": inter, "vocab_size": 151936, "tie_word_embeddings": tied, "rope_theta": 1000000,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 40960}


def _qwen3_drafter(target: dict[str, Any], layers: int) -> dict[str, Any]:
    """A z-lab DFlash drafter of a Qwen3 target: the target's per-layer sizes, its own depth, block 16,
    the mask row 151669 (a row the Qwen3 tokenizer leaves unused) and features of five target layers."""
    ids = [1, 9, 17, 25, 33] if target["num_hidden_layers"] == 36 else None
    return {**{k: target[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                      "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps",
                                      "max_position_embeddings")},
            "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "num_hidden_layers": layers,
            "block_size": 16, "num_target_layers": target["num_hidden_layers"],
            "dflash_config": {"mask_token_id": 151669, "target_layer_ids": ids}}


_QWEN3_4B = _qwen3(2560, 36, 32, 9728, tied=True)
_QWEN3_8B = _qwen3(4096, 36, 32, 12288, tied=False)
_LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
               "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500000.0,
               "rms_norm_eps": 1e-5, "max_position_embeddings": 131072}

# Hugging Face repository -> config.json values (see the module docstring for where they come from).
TARGETS: dict[str, dict[str, Any]] = {
    # The embedded default model (DESIGN section 4: 30 layers, D 576, 9 q / 3 kv heads, H 64, V 49152, tied).
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
        "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192},
    "Qwen/Qwen3-0.6B": _qwen3(1024, 28, 16, 3072, tied=True),
    "Qwen/Qwen3-1.7B": _qwen3(2048, 28, 16, 6144, tied=True),
    "Qwen/Qwen3-4B": _QWEN3_4B,
    "Qwen/Qwen3-8B": _QWEN3_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
}

# Published DFlash drafters (z-lab's collection, https://huggingface.co/collections/z-lab/dflash) whose
# config.json we have read: five draft layers each (DESIGN section 4 for Qwen3-8B). z-lab's Llama-3.1-8B
# drafter is not listed: plan it from a local copy of its config.json (``[model] drafter_config``).
DRAFTERS: dict[str, dict[str, Any]] = {
    "z-lab/Qwen3-4B-DFlash-b16": _qwen3_drafter(_QWEN3_4B, 5),
    "z-lab/Qwen3-8B-DFlash-b16": _qwen3_drafter(_QWEN3_8B, 5),
}
# The registered model name a job may give (decoder.registered_models) -> its entry.
REGISTERED = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def known_config(name_or_location: str, table: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """(repository, config) of the entry that ``name_or_location`` names, or None.

    Accepted: a repository (``Qwen/Qwen3-8B``), its bare name (``Qwen3-8B``), a registered
    model name, or a gs:// folder whose last path component is the bare name; case-insensitive.
    """
    value = REGISTERED.get(name_or_location, name_or_location)
    if value.startswith("gs://"):
        value = value.rstrip("/").rsplit("/", 1)[-1]
    for repo, cfg in table.items():
        if value.lower() in (repo.lower(), repo.split("/", 1)[1].lower()):
            return repo, cfg
    return None
