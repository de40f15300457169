"""Turning prompts into token ids: the job's prompt templates, and the model's own chat template.

One module, free of Beam, so the pipeline, the drafter trainer and the benchmark render a row the
same way on any host.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from dflash_batch.schemas import TEMPLATES

SUMMARIZE_INSTRUCTION = "Summarize the following text in a few sentences."


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


def summarize_messages(document: str, instruction: str = SUMMARIZE_INSTRUCTION) -> list[dict[str, str]]:
    """The chat a ``summarize`` job sends for one document."""
    return [{"role": "user", "content": f"{instruction}\n\n{document.strip()}"}]


def render_row(tokenizer, row: Mapping[str, Any], template: str, instruction: str = SUMMARIZE_INSTRUCTION) -> list[int]:
    """Token ids for a prompt row that already passed validation.

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
