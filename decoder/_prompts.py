"""Turning prompts into token ids the way the model's own chat template says."""

from __future__ import annotations

from typing import Mapping, Sequence


def render_messages(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a chat rendered with the tokenizer's template and a generation prompt.

    The template already writes every special token it wants, so nothing else
    (no extra BOS) is added when tokenizing the rendered text.
    """
    text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a plain prompt string, tokenized as-is."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
