"""Tests build decoders from keyword settings: ``make_decoder(target, mode="ngram", batch_size=3)``."""

from __future__ import annotations

from dflash_batch.decoder import DecodeConfig, Decoder, Drafter


def make_decoder(target, drafter: Drafter | None = None, proposer=None, **settings) -> Decoder:
    """``proposer``: a test's own proposer object (see ``oracle_proposer``); None: the mode's."""
    return Decoder(target, DecodeConfig(**settings), drafter, proposer=proposer)
