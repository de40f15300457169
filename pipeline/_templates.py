"""Job prompt templates: how a validated input row becomes the model's token ids."""

from __future__ import annotations

from typing import Any, Mapping

from dflash_batch.decoder import render_messages, tokenize_prompt

TEMPLATES = ("none", "summarize")

SUMMARIZE_INSTRUCTION = "Summarize the following text in a few sentences."


def summarize_messages(document: str, instruction: str = SUMMARIZE_INSTRUCTION) -> list[dict[str, str]]:
    """The chat a ``summarize`` job sends for one document."""
    return [{"role": "user", "content": f"{instruction}\n\n{document.strip()}"}]


def render_row(tokenizer, row: Mapping[str, Any], template: str, instruction: str = SUMMARIZE_INSTRUCTION) -> list[int]:
    """Token ids for a row that already passed validation.

    ``summarize`` builds a chat from ``document``; ``none`` renders ``messages`` with
    the model's chat template, or tokenizes ``prompt`` exactly as given.
    """
    if template == "summarize":
        return render_messages(tokenizer, summarize_messages(row["document"], instruction))
    if template == "none":
        if row.get("messages"):
            return render_messages(tokenizer, row["messages"])
        return tokenize_prompt(tokenizer, row["prompt"])
    raise ValueError(f"unknown prompt {template=}; choose one of {TEMPLATES}")
