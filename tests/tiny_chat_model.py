"""A tiny random Llama checkpoint with a real (tiny) tokenizer and chat template, made offline.

Pipeline tests render prompts with the model's own tokenizer, so the tiny checkpoint needs
one. A BPE tokenizer is trained here on a few sentences (a fixed corpus, so the same ids every
time), saved in Hugging Face format, and the model's vocabulary is sized to match it.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos as tiny_models.TINY expects
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Summarize the following text in a few sentences.",
    "user: assistant: system:",
    "We propose a new method for abstractive summarization of scientific papers.",
    "Results show large gains on two benchmarks, and the code is released.",
    "Prompts, completions and dead letters are written as Parquet files.",
]
ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()-\n ")
VOCAB_SIZE = 160


def make_tokenizer(folder: Path) -> int:
    """Saves the tokenizer into ``folder``; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, initial_alphabet=ALPHABET,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return tok.get_vocab_size()


def make_tiny_chat_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama (see tiny_models.TINY) whose vocabulary matches the tokenizer saved beside it."""
    from tiny_models import make_tiny_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder)
    make_tiny_checkpoint(folder, "llama", seed=seed, vocab_size=vocab)
    return folder
