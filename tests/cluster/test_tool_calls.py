"""K2 tool-call sections -> OpenAI tool calls: whole, split across stream chunks, malformed."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.tool_calls import (
    ARGUMENT_BEGIN,
    CALL_BEGIN,
    CALL_END,
    MARKERS,
    SECTION_BEGIN,
    SECTION_END,
    ToolCall,
    ToolCallParser,
    parse_call_id,
    parse_tool_calls,
)

SB, SE = SECTION_BEGIN[0], SECTION_END[0]


def section(*calls: tuple[str, str]) -> str:
    body = "".join(
        f"{CALL_BEGIN}functions.{name}:{i}{ARGUMENT_BEGIN}{args}{CALL_END}"
        for i, (name, args) in enumerate(calls)
    )
    return f"{SB}{body}{SE}"


def stream(text: str, cuts: list[int]) -> tuple[str, list[ToolCall], list]:
    """Feed ``text`` cut at ``cuts``; (content, calls rebuilt from the deltas, the deltas)."""
    parser = ToolCallParser()
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    content, deltas = "", []
    for a, b in zip(bounds, bounds[1:], strict=False):
        out = parser.feed(text[a:b])
        content += out.content
        deltas += out.calls
    out = parser.finish()
    content += out.content
    deltas += out.calls
    calls: list[ToolCall] = []
    for d in deltas:
        if d.id is not None:
            assert d.index == len(calls) and d.name and not d.arguments
            calls.append(ToolCall(d.id, d.name))
        else:
            assert d.index == len(calls) - 1 and d.arguments
            calls[d.index].arguments += d.arguments
    return content, calls, deltas


def test_one_call_after_content():
    args = json.dumps({"city": "Oslo", "unit": "C"})
    content, calls = parse_tool_calls("Let me check." + section(("get_weather", args)))
    assert content == "Let me check."
    assert calls == [ToolCall("functions.get_weather:0", "get_weather", args)]
    assert calls[0].to_openai() == {
        "id": "functions.get_weather:0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": args},
    }


def test_several_calls_whitespace_and_the_singular_marker():
    text = f"{SECTION_BEGIN[1]}\n {CALL_BEGIN} functions.a:0 {ARGUMENT_BEGIN}{{}}{CALL_END}\n"
    text += f"{CALL_BEGIN}functions.b.c:1{ARGUMENT_BEGIN}[1]{CALL_END} {SECTION_END[1]}"
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("functions.a:0", "a", "{}"),
        ("functions.b.c:1", "b.c", "[1]"),
    ]


def test_no_section_is_plain_text():
    text = "a < b and <| is not a marker, nor is <|tool_call_begin|> alone"
    assert parse_tool_calls(text) == (text, [])


def test_streaming_delta_shape():
    text = "Hi" + section(("f", '{"x": 1}'))
    content, calls, deltas = stream(text, [1, 5, 40, 41, 80])
    assert content == "Hi" and calls == parse_tool_calls(text)[1]
    assert deltas[0].id == "functions.f:0" and deltas[0].name == "f"
    assert "".join(d.arguments for d in deltas[1:]) == '{"x": 1}'


@pytest.mark.parametrize(
    "tail",
    [
        f"{SB}garbage{CALL_END}",  # text where a call should begin
        f"{SB}{CALL_BEGIN}not an id{ARGUMENT_BEGIN}{{}}{CALL_END}{SE}",  # bad id
        f"{SB}{CALL_BEGIN}functions.f:0{CALL_END}{SE}",  # no arguments marker
        f"{SB}{CALL_BEGIN}functions.f:0",  # cut inside the header
        f"{SB}{CALL_BEGIN}",  # cut after the call marker
        f"{SB}",  # cut after the section marker
        f"{SB}{CALL_BEGIN}functions.{'x' * 300}:0{ARGUMENT_BEGIN}{{}}{CALL_END}{SE}",  # huge id
    ],
)
def test_malformed_section_before_any_call_is_text(tail):
    text = "content " + tail
    assert parse_tool_calls(text) == (text, [])


def test_malformed_after_a_call_keeps_the_call_and_the_rest_is_text():
    good = f"{SB}{CALL_BEGIN}functions.f:0{ARGUMENT_BEGIN}{{}}{CALL_END}"
    content, calls = parse_tool_calls(good + "oops" + SE)
    assert [c.name for c in calls] == ["f"] and content == "oops" + SE
    # a call whose end marker never comes: its arguments stop where the format broke
    content, calls = parse_tool_calls(f"{SB}{CALL_BEGIN}functions.g:0{ARGUMENT_BEGIN}{{{SB}x")
    assert calls == [ToolCall("functions.g:0", "g", "{")] and content == f"{SB}x"


def test_cut_by_max_tokens_inside_arguments_keeps_what_arrived():
    content, calls = parse_tool_calls(f"{SB}{CALL_BEGIN}functions.g:0{ARGUMENT_BEGIN}" + '{"a": ')
    assert content == "" and calls == [ToolCall("functions.g:0", "g", '{"a": ')]


def test_parse_call_id():
    assert parse_call_id(" functions.get_weather:12\n") == (
        "functions.get_weather:12",
        "get_weather",
    )
    assert parse_call_id("get_weather:0") is None
    assert parse_call_id("functions.f:x") is None


# ---- properties: any chunking gives the answer of the whole text -----------------------------
_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True)
_plain = st.text(st.characters(codec="utf-8", exclude_characters="<|"), max_size=20)
_args = st.builds(json.dumps, st.dictionaries(_names, st.integers() | _plain, max_size=3))
_pieces = st.lists(
    st.sampled_from(MARKERS) | _plain | st.sampled_from(["<|", "|>", "functions.f:0", " "]),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(
    content=_plain,
    calls=st.lists(st.tuples(_names, _args), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_well_formed_sections_parse_the_same_in_any_chunks(content, calls, cuts):
    text = content + section(*calls)
    whole_content, whole_calls = parse_tool_calls(text)
    assert whole_content == content
    assert [(c.name, c.arguments) for c in whole_calls] == calls
    assert stream(text, cuts)[:2] == (whole_content, whole_calls)


@settings(max_examples=500, deadline=None)
@given(pieces=_pieces, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_text_parses_the_same_in_any_chunks_and_loses_nothing(pieces, cuts):
    text = "".join(pieces)
    content, calls = parse_tool_calls(text)
    assert stream(text, cuts)[:2] == (content, calls)
    if not calls:
        assert content == text  # without a call, every character comes back as content
    else:
        assert len(content) + sum(len(c.arguments) for c in calls) <= len(text)
