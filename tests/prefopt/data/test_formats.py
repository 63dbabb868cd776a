"""Row conversion: the three formats, and one-line errors that name the file, the row and the field."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefopt.data import DataError, detect_format, to_standard
from prefopt.data.formats import FIELDS

from ._helpers import make_tokenizer

SOURCE = "train.jsonl"


def convert(row: Any, tokenizer: Any = None) -> dict[str, str]:
    return to_standard(row, source=SOURCE, index=3, tokenizer=tokenizer)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def assert_row_error(err: pytest.ExceptionInfo[DataError], field: str | None, fragment: str) -> None:
    message = str(err.value)
    assert message.startswith(f"{SOURCE} row 3: "), message
    if field is not None:
        assert f"field '{field}'" in message, message
    assert fragment in message, message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------------------- standard
def test_standard_row_is_returned_as_is_without_extra_fields() -> None:
    row = {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No.", "score": 3, "id": "x"}
    assert detect_format(row) == "standard"
    assert convert(row) == {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."}


# ---------------------------------------------------------------------------------------------------- conversational
def test_conversational_with_explicit_prompt(tokenizer: Any) -> None:
    row = {
        "prompt": [{"role": "system", "content": "w1"}, user("w2")],
        "chosen": [assistant("w3")],
        "rejected": [assistant("w4 w5")],
    }
    assert detect_format(row) == "conversational"
    assert convert(row, tokenizer) == {
        "prompt": "<|system|> w1 <|user|> w2 <|assistant|> ",
        "chosen": "w3 ",
        "rejected": "w4 w5 ",
    }


def test_conversational_without_prompt_uses_the_shared_leading_messages(tokenizer: Any) -> None:
    shared = [user("w1"), assistant("w2"), user("w3")]
    row = {"chosen": [*shared, assistant("w4")], "rejected": [*shared, assistant("w5")], "prompt": None}
    assert detect_format(row) == "conversational"
    assert convert(row, tokenizer) == {
        "prompt": "<|user|> w1 <|assistant|> w2 <|user|> w3 <|assistant|> ",
        "chosen": "w4 ",
        "rejected": "w5 ",
    }


def test_conversational_message_extra_keys_are_ignored(tokenizer: Any) -> None:
    row = {"prompt": [{**user("w1"), "name": None}], "chosen": [assistant("w2")], "rejected": [assistant("w3")]}
    assert convert(row, tokenizer)["prompt"] == "<|user|> w1 <|assistant|> "


@pytest.mark.parametrize("tokenizer_", [None, make_tokenizer(chat_template=None)], ids=["none", "no-template"])
def test_conversational_needs_a_tokenizer_with_a_chat_template(tokenizer_: Any) -> None:
    row = {"chosen": [user("w1"), assistant("w2")], "rejected": [user("w1"), assistant("w3")]}
    with pytest.raises(DataError) as err:
        convert(row, tokenizer_)
    assert_row_error(err, None, "needs a tokenizer with a chat template")


def test_chat_template_whose_prompt_is_not_a_prefix_is_an_error() -> None:
    # The generation prompt "GEN" never appears in the rendered conversation.
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}GEN {% endif %}"
    row = {"prompt": [user("w1")], "chosen": [assistant("w2")], "rejected": [assistant("w3")]}
    with pytest.raises(DataError) as err:
        convert(row, make_tokenizer(chat_template=template))
    assert_row_error(err, "chosen", "is not a prefix")


def test_chat_template_failure_is_a_row_error() -> None:
    template = "{{ raise_exception('roles must alternate') }}"
    row = {"prompt": [user("w1")], "chosen": [assistant("w2")], "rejected": [assistant("w3")]}
    with pytest.raises(DataError) as err:
        convert(row, make_tokenizer(chat_template=template))
    assert_row_error(err, "prompt", "cannot be rendered by the chat template: roles must alternate")


# -------------------------------------------------------------------------------------------------------------- HH
def test_hh_splits_after_the_last_shared_assistant_marker() -> None:
    history = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is 2+2?\n\nAssistant:"
    row = {"chosen": history + " I think 4", "rejected": history + " I think 5", "prompt": None}
    assert detect_format(row) == "hh"
    assert convert(row) == {"prompt": history, "chosen": " I think 4", "rejected": " I think 5"}


def test_hh_split_when_the_transcripts_diverge_at_an_earlier_turn() -> None:
    chosen = "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y"
    rejected = "\n\nHuman: a\n\nAssistant: z"
    assert convert({"chosen": chosen, "rejected": rejected}) == {
        "prompt": "\n\nHuman: a\n\nAssistant:",
        "chosen": " x\n\nHuman: b\n\nAssistant: y",
        "rejected": " z",
    }


# ----------------------------------------------------------------------------------------------------------- errors
HH = "\n\nHuman: w1\n\nAssistant:"
BAD_ROWS = {
    "missing field": ({"prompt": "p", "chosen": "c"}, "rejected", "is missing"),
    "null field": ({"prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "is missing (null)"),
    "int instead of str": ({"prompt": "p", "chosen": 7, "rejected": "r"}, "chosen", "got int"),
    "float prompt": ({"prompt": 1.5, "chosen": "c", "rejected": "r"}, "prompt", "got float"),
    "empty string": ({"prompt": "", "chosen": "c", "rejected": "r"}, "prompt", "is empty"),
    "whitespace string": ({"prompt": "p", "chosen": "c", "rejected": " \n"}, "rejected", "is empty"),
    "chosen == rejected": ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "equals 'chosen'"),
    "hh without marker": ({"chosen": "c", "rejected": "r"}, "prompt", "not HH-style"),
    "hh identical": ({"chosen": HH + " a", "rejected": HH + " a"}, "rejected", "equals 'chosen'"),
    "hh empty completion": ({"chosen": HH, "rejected": HH + " a"}, "chosen", "is empty after conversion"),
    "hh missing rejected": ({"chosen": HH + " a"}, "rejected", "is missing"),
}
BAD_CONVERSATIONS = {
    "wrong role": (
        {"prompt": [user("w1")], "chosen": [{"role": "tool", "content": "w2"}], "rejected": [assistant("w3")]},
        "chosen",
        "message 0 has role 'tool'",
    ),
    "user completion": (
        {"prompt": [user("w1")], "chosen": [assistant("w2")], "rejected": [user("w3")]},
        "rejected",
        "completion messages must be 'assistant'",
    ),
    "int content": (
        {"prompt": [user("w1")], "chosen": [{"role": "assistant", "content": 3}], "rejected": [assistant("w3")]},
        "chosen",
        "message 0 content must be a string, got int",
    ),
    "message not an object": (
        {"prompt": [user("w1"), "w2"], "chosen": [assistant("w2")], "rejected": [assistant("w3")]},
        "prompt",
        "message 1 must be an object",
    ),
    "string completion beside messages": (
        {"prompt": [user("w1")], "chosen": "w2", "rejected": [assistant("w3")]},
        "chosen",
        "must be a list of messages",
    ),
    "empty message list": ({"prompt": [user("w1")], "chosen": [], "rejected": [assistant("w3")]}, "chosen", "empty"),
    "no shared leading messages": (
        {"chosen": [user("w1"), assistant("w2")], "rejected": [user("w9"), assistant("w3")]},
        "prompt",
        "share no leading messages",
    ),
    "identical conversations": (
        {"chosen": [user("w1"), assistant("w2")], "rejected": [user("w1"), assistant("w2")]},
        "rejected",
        "equals 'chosen'",
    ),
    "chosen is a prefix of rejected": (
        {"chosen": [user("w1"), assistant("w2")], "rejected": [user("w1"), assistant("w2"), assistant("w3")]},
        "chosen",
        "has no messages after the prompt",
    ),
    "identical after rendering": (
        {"prompt": [user("w1")], "chosen": [assistant("w2")], "rejected": [{**assistant("w2"), "x": 1}]},
        "rejected",
        "equals 'chosen'",
    ),
}


@pytest.mark.parametrize(("row", "field", "fragment"), BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_row_names_file_row_and_field(row: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(DataError) as err:
        convert(row)
    assert_row_error(err, field, fragment)


@pytest.mark.parametrize(("row", "field", "fragment"), BAD_CONVERSATIONS.values(), ids=BAD_CONVERSATIONS.keys())
def test_bad_conversation_names_file_row_and_field(
    row: dict[str, Any], field: str, fragment: str, tokenizer: Any
) -> None:
    with pytest.raises(DataError) as err:
        convert(row, tokenizer)
    assert_row_error(err, field, fragment)


def test_int_message_error_reads_as_the_brief_says() -> None:
    with pytest.raises(
        DataError, match=r"^train.jsonl row 3: field 'chosen' must be a string or a list of messages, got int$"
    ):
        convert({"prompt": "p", "chosen": 7, "rejected": "r"})


@pytest.mark.parametrize("row", [["p", "c", "r"], "p", None])
def test_non_dict_row_is_an_error(row: Any) -> None:
    with pytest.raises(DataError) as err:
        convert(row)
    assert_row_error(err, None, "must be an object")


def test_long_bad_values_are_quoted_briefly(tokenizer: Any) -> None:
    row = {"prompt": [user("w1")], "chosen": [{"role": "x" * 10_000 + "\n", "content": "w2"}], "rejected": []}
    with pytest.raises(DataError) as err:
        convert(row, tokenizer)
    assert len(str(err.value)) < 200
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------------- property
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12))
# Few distinct values, so that equal and blank fields are common; most are valid.
TEXT = st.sampled_from(["", " ", "a", "b", "a b", "\n🙂", "e\u0301"]) | st.text(max_size=8)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "assistant", "tool"]), "content": TEXT | SCALARS}
)
VALUES = st.one_of(TEXT, st.lists(MESSAGE | SCALARS, max_size=3), SCALARS)
RANDOM_ROWS = st.fixed_dictionaries({}, optional={"prompt": VALUES, "chosen": VALUES, "rejected": VALUES})


def _hh(human: str, chosen: str, rejected: str) -> dict[str, Any]:
    return {
        "chosen": f"\n\nHuman: {human}\n\nAssistant:{chosen}",
        "rejected": f"\n\nHuman: {human}\n\nAssistant:{rejected}",
    }


def _chat(prompt: str, chosen: str, rejected: str, explicit: bool) -> dict[str, Any]:
    head = [user(prompt)]
    if explicit:
        return {"prompt": head, "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]}
    return {"chosen": [*head, assistant(chosen)], "rejected": [*head, assistant(rejected)]}


def _mutate(row: dict[str, Any], key: str, value: Any, how: str) -> dict[str, Any]:
    if how == "delete":
        return {k: v for k, v in row.items() if k != key}
    return {**row, key: value} if how == "replace" else row


VALID_ROWS = st.one_of(
    st.fixed_dictionaries({"prompt": TEXT, "chosen": TEXT, "rejected": TEXT}),
    st.builds(_hh, TEXT, TEXT, TEXT),
    st.builds(_chat, TEXT, TEXT, TEXT, st.booleans()),
)
NEAR_VALID_ROWS = st.builds(
    _mutate, VALID_ROWS, st.sampled_from(FIELDS), VALUES, st.sampled_from(["keep", "keep", "delete", "replace"])
)
# Mostly near-valid rows, so that every format's success path is exercised too.
ANY_ROW = st.one_of(
    NEAR_VALID_ROWS, NEAR_VALID_ROWS, NEAR_VALID_ROWS, RANDOM_ROWS, SCALARS | st.lists(SCALARS, max_size=3)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=ANY_ROW)
def test_to_standard_returns_three_strings_or_raises_data_error(row: Any, tokenizer: Any) -> None:
    try:
        pair = convert(row, tokenizer)
    except DataError as err:
        assert str(err).startswith(f"{SOURCE} row 3: ")
        assert "\n" not in str(err)
        return
    assert set(pair) == {"prompt", "chosen", "rejected"}
    assert all(isinstance(value, str) and value.strip() for value in pair.values())
    assert pair["chosen"] != pair["rejected"]


def test_string_prompt_beside_message_lists_ultrafeedback_style(tokenizer):
    """UltraFeedback-binarized: a string prompt and message lists that repeat it as the first user turn."""
    row = {"prompt": "w1", "chosen": [user("w1"), assistant("w2")], "rejected": [user("w1"), assistant("w3")]}
    pair = to_standard(row, source="uf.jsonl", index=0, tokenizer=tokenizer)
    explicit = to_standard(
        {"prompt": [user("w1")], "chosen": [assistant("w2")], "rejected": [assistant("w3")]},
        source="uf.jsonl",
        index=0,
        tokenizer=tokenizer,
    )
    assert pair == explicit
    bare = {"prompt": "w1", "chosen": [assistant("w2")], "rejected": [assistant("w3")]}
    assert to_standard(bare, source="uf.jsonl", index=0, tokenizer=tokenizer) == explicit
