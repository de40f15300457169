"""validate_prompt_row: a reason naming the field for each kind of bad row, never an exception."""

import numpy as np
import pytest

from dflash_batch.schemas import validate_prompt_row

GOOD = {"id": "r1", "prompt": "Say hi.\n\tThanks\r\n"}
CHAT = {"id": "r2", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
DOC = {"id": "r3", "document": "A long story."}


@pytest.mark.parametrize(
    ("row", "template"),
    [
        (GOOD, "none"),
        (CHAT, "none"),
        (DOC, "summarize"),
        ({**GOOD, "messages": None, "document": None}, "none"),  # unused columns are null
        ({**CHAT, "prompt": ""}, "none"),  # an empty unused prompt beside messages
        ({**GOOD, "max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": -5, "stop": ["\n"]}, "none"),
        ({**GOOD, "max_new_tokens": np.int32(4), "temperature": np.float32(0.7)}, "none"),
        ({**DOC, "prompt": None, "unknown": object()}, "summarize"),
    ],
)
def test_valid_row_passes(row, template):
    assert validate_prompt_row(row, template) is None


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "x"}, "missing id"),
        ({"id": None, "prompt": "x"}, "missing id"),
        ({"id": "  ", "prompt": "x"}, "id is empty"),
        ({"id": 5, "prompt": "x"}, "id must be a string, got int"),
        ({"id": "a"}, "missing prompt or messages"),
        ({"id": "a", "prompt": ""}, "prompt is empty"),
        ({"id": "a", "prompt": " \n"}, "prompt is empty"),
        ({"id": "a", "prompt": b"hi"}, "prompt must be a string, got bytes"),
        ({"id": "a", "prompt": "x", "messages": CHAT["messages"]}, "both prompt and messages given; use one"),
        ({"id": "a", "messages": []}, "messages is empty"),
        ({"id": "a", "messages": "hi"}, "messages must be a list"),
        ({"id": "a", "messages": ["hi"]}, "messages[0] must be a {role, content} struct"),
        ({"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
         "messages[1].role must be one of system/user/assistant/tool"),  # fmt: skip
        ({"id": "a", "messages": [{"role": "user", "content": None}]}, "missing messages[0].content"),
        ({"id": "a", "messages": [{"role": "user", "content": "a\x1bb"}]},
         "messages[0].content contains control characters (U+001B at offset 1)"),  # fmt: skip
        ({"id": "a", "prompt": "x\ud800"}, "prompt is not valid UTF-8 (lone surrogate U+D800 at offset 1)"),
        ({"id": "a", "prompt": "x\x85"}, "prompt contains control characters (U+0085 at offset 1)"),  # C1
        ({"id": "a\x00", "prompt": "x"}, "id contains control characters (U+0000 at offset 1)"),
        ({"id": "a", "prompt": "x", "max_new_tokens": -3}, "max_new_tokens must be a positive integer, got -3"),
        ({"id": "a", "prompt": "x", "max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
        ({"id": "a", "prompt": "x", "max_new_tokens": 2.5}, "max_new_tokens must be a positive integer, got 2.5"),
        ({"id": "a", "prompt": "x", "max_new_tokens": True}, "max_new_tokens must be a positive integer"),
        ({"id": "a", "prompt": "x", "max_new_tokens": 2**31}, "max_new_tokens must fit in int32"),
        ({"id": "a", "prompt": "x", "temperature": -1.0}, "temperature must be >= 0, got -1.0"),
        ({"id": "a", "prompt": "x", "temperature": float("nan")}, "temperature must be a finite number, got nan"),
        ({"id": "a", "prompt": "x", "temperature": "0.7"}, "temperature must be a finite number, got '0.7'"),
        ({"id": "a", "prompt": "x", "top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"id": "a", "prompt": "x", "top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"id": "a", "prompt": "x", "seed": "7"}, "seed must be an integer"),
        ({"id": "a", "prompt": "x", "seed": 2**63}, "seed must fit in int64"),
        ({"id": "a", "prompt": "x", "stop": "END"}, "stop must be a list of non-empty strings"),
        ({"id": "a", "prompt": "x", "stop": ["END", ""]}, "stop must be a list of non-empty strings"),
        ({"id": "a", "prompt": "x", "stop": ["\x07"]}, "stop[0] contains control characters"),
    ],
)
def test_bad_row_gives_a_reason_naming_the_field(row, reason):
    got = validate_prompt_row(row, "none")
    assert got is not None and got.startswith(reason), got


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"id": "a", "prompt": "x"}, "missing document"),
        ({"id": "a", "document": ""}, "document is empty"),
        ({"id": "a", "document": "Hello world\x07"}, "document contains control characters (U+0007 at offset 11)"),
    ],
)
def test_summarize_needs_a_clean_document(row, reason):
    assert validate_prompt_row(row, "summarize") == reason


def test_duplicate_id_is_caught_with_seen_ids():
    seen: set[str] = set()
    assert validate_prompt_row({"id": "x", "prompt": "a"}, "none", seen) is None
    assert validate_prompt_row({"id": "x", "prompt": "b"}, "none", seen) == "duplicate id 'x'"
    assert validate_prompt_row({"id": "y", "prompt": "c"}, "none", seen) is None
    assert seen == {"x", "y"}


def test_first_row_claims_its_id_even_when_it_fails_otherwise():
    seen: set[str] = set()
    assert validate_prompt_row({"id": "x", "prompt": ""}, "none", seen) == "prompt is empty"
    assert validate_prompt_row({"id": "x", "prompt": "b"}, "none", seen) == "duplicate id 'x'"


def test_without_seen_ids_repeats_are_not_checked():
    assert validate_prompt_row({"id": "x", "prompt": "a"}, "none") is None
    assert validate_prompt_row({"id": "x", "prompt": "a"}, "none") is None


@pytest.mark.parametrize(
    ("row", "template", "reason"),
    [
        ({"id": "a", "prompt": "x" * 11}, "none", "prompt is too long (11 chars > max_prompt_chars=10)"),
        ({"id": "a", "document": "x" * 11}, "summarize", "document is too long (11 chars > max_prompt_chars=10)"),
        ({"id": "a", "messages": [{"role": "user", "content": "x" * 6}] * 2}, "none",
         "messages is too long (12 chars > max_prompt_chars=10)"),  # fmt: skip
    ],
)
def test_max_prompt_chars_caps_the_text(row, template, reason):
    assert validate_prompt_row(row, template, max_prompt_chars=10) == reason
    assert validate_prompt_row(row, template, max_prompt_chars=12) is None


def test_a_row_that_is_not_a_mapping_gets_a_reason():
    assert validate_prompt_row(None, "none") == "row must be a mapping, got NoneType"  # type: ignore[arg-type]


def test_unknown_template_is_a_caller_error():
    with pytest.raises(ValueError, match="unknown template 'chat'"):
        validate_prompt_row(GOOD, "chat")
