"""The memory table of docs/design.md, made by the memory plan: ``python -P -m dflash_batch.decoder._memory_table``.

The published Qwen3-4B and Qwen3-8B shapes, each with a DFlash drafter of 5 layers shaped
like its target's (as z-lab's Qwen3-8B-DFlash-b16), on TPU slices, in both dtypes. A test
checks that docs/design.md holds exactly what this prints, so the documented numbers are the
code's.
"""

from __future__ import annotations

from dflash_batch.decoder import DecodeConfig, DrafterConfig, TargetConfig
from dflash_batch.decoder._memory import GB, HBM_PER_CHIP, LayoutError, choose_layout, plan
from dflash_batch.decoder._mesh import legal_tensor_parallel


def qwen3(hidden: int, intermediate: int, tied: bool) -> TargetConfig:
    """A Qwen3 dense model of the published family shape (36 layers, 32 q / 8 kv heads of 128)."""
    return TargetConfig(family="qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate,
                        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                        tie_word_embeddings=tied, max_position_embeddings=40960)


def drafter_for(cfg: TargetConfig) -> DrafterConfig:
    """A block-16, 5-layer DFlash drafter with its target's layer shapes and default feature layers."""
    return DrafterConfig(block_size=16, mask_token_id=151669, target_layer_ids=(1, 9, 17, 25, 33), num_layers=5,
                         hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                         rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, vocab_size=cfg.vocab_size)


QWEN3_4B = qwen3(2560, 9728, tied=True)
QWEN3_8B = qwen3(4096, 12288, tied=False)
MODELS = {"Qwen3-4B + DFlash drafter": (QWEN3_4B, drafter_for(QWEN3_4B)),
          "Qwen3-8B + DFlash drafter": (QWEN3_8B, drafter_for(QWEN3_8B))}
SLICES = [("v5e-4", "v5e", 4), ("v5e-8", "v5e", 8), ("v6e-1", "v6e", 1), ("v6e-4", "v6e", 4), ("v5p-4", "v5p", 4)]
# Batch 64 and the default prompt buckets (up to 2048) with room for 2048 new tokens: the
# largest bucket's cache is 4096 rows per slot.
TABLE_DECODE = DecodeConfig(mode="dflash", block_size="auto", batch_size=64, max_new_tokens=2048)
DTYPES = ("float32", "bfloat16")


def memory_table(models: dict = MODELS, slices: list[tuple[str, str, int]] = SLICES,
                 decode: DecodeConfig = TABLE_DECODE, dtypes: tuple[str, ...] = DTYPES) -> str:
    """A markdown table of ``choose_layout`` per model and TPU slice: the D x T chosen and the GB
    per chip, for each dtype, or what the largest tensor-parallel layout would need.

    ``models``: name -> (TargetConfig, DrafterConfig or None); ``slices``: (label, chip
    generation, chips).
    """
    head = "| model | slice | " + " | ".join(f"{name}: D x T, GB per chip" for name in dtypes) + " |"
    lines = [head, "|---|---|" + "---|" * len(dtypes)]
    for name, (cfg, dcfg) in models.items():
        for label, gen, chips in slices:
            cells = []
            for dtype in dtypes:
                capacity = HBM_PER_CHIP[gen]
                try:
                    p = choose_layout(cfg, dcfg, chips=chips, capacity=capacity, decode=decode, dtype=dtype)
                    cells.append(f"{p.data} x {p.model}, {p.total / GB:.1f} of {capacity / GB:.0f}")
                except LayoutError:
                    t = max(legal_tensor_parallel(cfg, dcfg, chips))
                    p = plan(cfg, dcfg, decode=decode, dtype=dtype, data=chips // t, model=t, capacity=capacity)
                    cells.append(f"does not fit ({p.data} x {p.model} needs {p.total / GB:.1f})")
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(memory_table())
