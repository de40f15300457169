"""check_input_schema: refuse, naming the column, inputs that cannot run; accept compatible ones."""

import pyarrow as pa
import pytest

from dflash_batch.schemas import PROMPTS_SCHEMA, SchemaError, check_input_schema


def test_the_full_prompts_schema_is_accepted_for_both_templates():
    check_input_schema(PROMPTS_SCHEMA, "none")
    check_input_schema(PROMPTS_SCHEMA, "summarize")


def test_compatible_types_are_accepted():
    schema = pa.schema([
        ("id", pa.large_string()),
        ("prompt", pa.string_view()),
        ("messages", pa.large_list(pa.struct([("role", pa.dictionary(pa.int8(), pa.string())),
                                              ("content", pa.large_string()), ("name", pa.string())]))),
        ("max_new_tokens", pa.int64()),
        ("temperature", pa.float64()),
        ("top_p", pa.float16()),
        ("seed", pa.uint32()),
        ("stop", pa.large_list(pa.large_string())),
        ("extra", pa.int64()),
    ])  # fmt: skip
    check_input_schema(schema, "none")


def test_an_all_null_optional_column_is_accepted():
    check_input_schema(pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.null())]), "none")


@pytest.mark.parametrize(
    ("column", "type_"),
    [
        ("id", pa.int64()),
        ("prompt", pa.binary()),
        ("messages", pa.list_(pa.string())),
        ("messages", pa.list_(pa.struct([("role", pa.string())]))),
        ("max_new_tokens", pa.float32()),
        ("seed", pa.string()),
        ("temperature", pa.string()),
        ("stop", pa.string()),
    ],
)
def test_an_incompatible_type_is_refused_naming_the_column(column, type_):
    fields = {"id": pa.string(), "prompt": pa.string(), column: type_}
    with pytest.raises(SchemaError, match=f"input column '{column}' has type"):
        check_input_schema(pa.schema(list(fields.items())), "none")


def test_missing_template_column_is_refused_listing_the_columns():
    with pytest.raises(SchemaError) as err:
        check_input_schema(pa.schema([("id", pa.string()), ("a", pa.string()), ("b", pa.int8())]), "summarize")
    assert str(err.value) == "input has no 'document' column, which template 'summarize' needs; columns: id, a, b"


def test_template_none_needs_prompt_or_messages():
    with pytest.raises(SchemaError, match="no 'prompt' or 'messages' column, which template 'none' needs"):
        check_input_schema(pa.schema([("id", pa.string()), ("document", pa.string())]), "none")


def test_missing_id_column_is_refused():
    with pytest.raises(SchemaError, match="no 'id' column"):
        check_input_schema(pa.schema([("prompt", pa.string())]), "none")


def test_an_all_null_required_column_is_refused():
    with pytest.raises(SchemaError, match="'document' is null in every row"):
        check_input_schema(pa.schema([("id", pa.string()), ("document", pa.null())]), "summarize")


def test_repeated_column_is_refused():
    with pytest.raises(SchemaError, match="repeated column"):
        check_input_schema(pa.schema([("id", pa.string()), ("prompt", pa.string()), ("id", pa.string())]), "none")


def test_carried_column_that_shadows_an_output_is_refused():
    with pytest.raises(SchemaError, match="'worker'"):
        check_input_schema(pa.schema([("id", pa.string()), ("prompt", pa.string()), ("worker", pa.int64())]), "none")


def test_unknown_template_is_refused():
    with pytest.raises(SchemaError, match="unknown template"):
        check_input_schema(PROMPTS_SCHEMA, "chat")
