"""The OpenAI surface without a cluster: request fields, tools in the prompt, and responses
(n choices, tool calls, logprobs) written from scripted flow events."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.errors import ApiError
from cluster.flow import Finished, Tokens
from cluster.ingress import chat_prompt, parse_body
from cluster.protocol import ChatCompletionRequest, CompletionRequest
from cluster.responses import Choice, Response
from cluster.tool_calls import ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END
from common.sampling import TokenLogprob
from model.tokenizer import Tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
USER = [{"role": "user", "content": "Weather in Oslo?"}]


def chat(**kw) -> ChatCompletionRequest:
    return parse_body(
        json.dumps({"model": "m", "messages": USER, **kw}).encode(), ChatCompletionRequest
    )


def status_of(model, body: dict) -> int:
    try:
        parse_body(json.dumps(body).encode(), model)
    except ApiError as e:
        return e.status
    return 200


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.load(tiny_model_dir)


# ---- fields ---------------------------------------------------------------------------------
def test_unknown_fields_are_ignored_and_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="cluster.ingress")
    body = {"model": "m", "prompt": "hi", "best_of_luck": 2, "stream_options": {"x_extra": 1}}
    for _ in range(3):
        req = parse_body(json.dumps(body).encode(), CompletionRequest)
    assert req.prompt == "hi"
    warned = [r.getMessage() for r in caplog.records if "best_of_luck" in r.getMessage()]
    assert len(warned) <= 1  # once per process (another test may have logged it already)
    assert sorted(req.unknown_fields()) == ["best_of_luck", "stream_options.x_extra"]
    msg = chat(store=False, metadata={"a": "b"}, reasoning_effort="low").messages[0]
    assert msg.text() == "Weather in Oslo?"


@pytest.mark.parametrize(
    "extra, field",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"12": 5}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty/frequency_penalty"),
        ({"n": 17}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
        ),
    ],
)
def test_fields_we_cannot_honour_are_400_naming_them(extra, field):
    with pytest.raises(ApiError) as e:
        parse_body(
            json.dumps({"model": "m", "messages": USER, **extra}).encode(), ChatCompletionRequest
        )
    assert (
        e.value.status == 400 and e.value.param == field and field.split("/")[0] in e.value.message
    )


def test_neutral_values_and_client_defaults_pass():
    ok = chat(
        n=1, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, response_format={"type": "text"},
        logprobs=False, stream=False, parallel_tool_calls=True, tools=TOOLS, tool_choice="auto",
        seed=3, user="u", stream_options={"include_usage": True},
    )  # fmt: skip
    assert ok.num_logprobs is None and ok.tool_mode == "auto"
    for extra in ({"echo": True}, {"suffix": "x"}, {"best_of": 3}):
        assert status_of(CompletionRequest, {"model": "m", "prompt": "a", **extra}) == 400
    assert status_of(CompletionRequest, {"model": "m", "prompt": "a", "best_of": 2, "n": 2}) == 200
    assert status_of(CompletionRequest, {"model": "m", "prompt": "a", "logprobs": 21}) == 422
    assert (
        status_of(
            ChatCompletionRequest, {"model": "m", "messages": USER, "tool_choice": "required"}
        )
        == 422
    )


def test_choice_seeds_and_logprob_settings():
    req = chat(seed=7, n=3, logprobs=True, top_logprobs=2, temperature=0.5)
    assert [req.sampling(i).seed for i in range(3)] == [7, 8, 9]
    assert req.sampling().num_logprobs == 2 and chat(logprobs=True).num_logprobs == 0
    completion = parse_body(b'{"model": "m", "prompt": "a", "logprobs": 4}', CompletionRequest)
    assert completion.sampling().num_logprobs == 4


# ---- tools in the prompt --------------------------------------------------------------------
def test_tools_and_tool_choice_shape_the_prompt(tok):
    def text(**kw):
        ids, forced = chat_prompt(chat(**kw), tok)
        return tok.decode(ids), forced

    plain, _ = text()
    auto, forced = text(tools=TOOLS)
    assert forced == "" and auto.startswith("<|im_system|>tool_declare<|im_middle|>[")
    assert auto.endswith(plain) and '"get_weather"' in auto
    assert text(tools=TOOLS, tool_choice="none") == (plain, "")
    required, forced = text(tools=TOOLS, tool_choice="required")
    assert forced == SECTION_BEGIN[0] and required == auto + forced
    named, forced = text(
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert forced == f"{SECTION_BEGIN[0]}{CALL_BEGIN}functions.get_weather:0{ARGUMENT_BEGIN}"
    assert named == auto + forced


def test_the_k2_model_card_tool_loop_renders(tok):
    """The assistant message sent back as returned, then a tool message with its id and name."""
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}  # fmt: skip
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "name": "get_weather", "content": "12C"},
    ]
    ids, _ = chat_prompt(chat(messages=messages, tools=TOOLS, tool_choice="auto"), tok)
    text = tok.decode(ids)
    assert f"{CALL_BEGIN}functions.get_weather:0{ARGUMENT_BEGIN}" in text
    assert "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n12C" in text


# ---- responses from scripted events ---------------------------------------------------------
class _Metric:
    def inc(self, *a, **k):
        pass

    observe = inc


def _ingress(tok):
    metrics = SimpleNamespace(**{n: _Metric() for n in (
        "ttft", "itl", "e2e", "requests", "output_tokens", "prompt_tokens", "cached_tokens")})  # fmt: skip
    return SimpleNamespace(tokenizer=tok, metrics=metrics, _tags={"model": "m"})


async def _events(batches, reason="stop", logprobs=False):
    for ids in batches:
        lps = [TokenLogprob(-0.5, (t, 1), (-0.5, -2.0)) for t in ids] if logprobs else None
        yield Tokens(ids, lps)
    yield Finished(reason)


def _respond(tok, body, scripts, kind="chat", stream=False, forced="", tool_mode="off"):
    choices = [Choice(i, tok, body.stop_strings, tool_mode, forced) for i in range(len(scripts))]
    out = Response(_ingress(tok), body, "chatcmpl-1", [1, 2, 3], kind, 0, 0.0, choices)
    streams = [_events(*s) for s in scripts]

    async def run():
        if not stream:
            return await out.json(streams)
        return [c async for c in out.sse(streams)]

    return asyncio.run(run())


def _sse_json(chunks):
    return [json.loads(c[6:]) for c in chunks if c.startswith("data: {")]


def test_tool_call_answer_whole_and_streamed(tok):
    text = "Checking." + SECTION_BEGIN[0] + CALL_BEGIN + "functions.get_weather:0" + ARGUMENT_BEGIN
    text += '{"city": "Oslo"}' + CALL_END + SECTION_END[0]
    ids = tok.encode(text)
    body = chat(tools=TOOLS)
    answer = _respond(tok, body, [([ids[:3], ids[3:9], ids[9:]],)], tool_mode="auto")
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    assert choice["message"]["tool_calls"] == [{
        "id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }]  # fmt: skip
    chunks = _sse_json(_respond(tok, body, [([[t] for t in ids],)], stream=True, tool_mode="auto"))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0] == {"index": 0, "id": "functions.get_weather:0", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Oslo"}'
    assert "".join(d.get("content") or "" for d in deltas) == "Checking."
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # tool_choice none: the same tokens are plain text
    answer = _respond(tok, chat(), [([ids],)])
    assert answer["choices"][0]["message"]["content"] == text
    assert answer["choices"][0]["finish_reason"] == "stop"


def test_malformed_tool_output_is_text_and_a_named_call_is_forced(tok):
    broken = SECTION_BEGIN[0] + "not a call"
    answer = _respond(tok, chat(tools=TOOLS), [([tok.encode(broken)],)], tool_mode="auto")
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": broken}
    forced = f"{SECTION_BEGIN[0]}{CALL_BEGIN}functions.get_weather:0{ARGUMENT_BEGIN}"
    rest = tok.encode('{"city": "Rome"}' + CALL_END + SECTION_END[0])
    answer = _respond(tok, chat(tools=TOOLS), [([rest],)], forced=forced, tool_mode="named")
    (call,) = answer["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}


def test_n_choices_logprobs_and_usage(tok):
    body = chat(n=3, logprobs=True, top_logprobs=2)
    scripts = [([tok.encode("ab"), tok.encode("c")], "length", True) for _ in range(3)]
    answer = _respond(tok, body, scripts)
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    n_out = len(tok.encode("ab")) + len(tok.encode("c"))
    assert (
        answer["usage"]["completion_tokens"] == 3 * n_out and answer["usage"]["prompt_tokens"] == 3
    )
    content = answer["choices"][1]["logprobs"]["content"]
    assert len(content) == n_out and content[0]["logprob"] == -0.5
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == [-0.5, -2.0]
    assert bytes(content[0]["bytes"]).decode("utf-8", "replace") == content[0]["token"]
    chunks = _sse_json(_respond(tok, body, scripts, stream=True))
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"] and c["choices"][0]["finish_reason"]}  # fmt: skip
    assert finishes == {0: "length", 1: "length", 2: "length"}
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["index"] == 2
                for e in (c["choices"][0]["logprobs"] or {}).get("content", [])]  # fmt: skip
    assert len(streamed) == n_out


def test_completion_logprobs_legacy_shape(tok):
    body = parse_body(b'{"model": "m", "prompt": "a", "logprobs": 2}', CompletionRequest)
    ids = tok.encode("hello")
    answer = _respond(tok, body, [([ids], "length", True)], kind="completion")
    lp = answer["choices"][0]["logprobs"]
    assert answer["choices"][0]["text"] == "hello"
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
    assert "".join(lp["tokens"]) == "hello" and lp["text_offset"][0] == 0


# ---- fuzzing: any body is an answer or an OpenAI error, never a crash -----------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bot"]) | _json},
    optional={
        "content": st.text(max_size=30) | _json | st.just([{"type": "text", "text": "x"}]),
        "tool_calls": st.just([{"id": "functions.f:0", "type": "function",
                                "function": {"name": "f", "arguments": "{}"}}]) | _json,
        "tool_call_id": st.text(max_size=10) | _json,
        "name": _json,
    },
)  # fmt: skip
_fields = {
    "model": st.just("m") | _json,
    "messages": st.lists(_message, max_size=3) | _json,
    "prompt": st.text(max_size=20) | st.lists(st.integers(-5, 10**6), max_size=4) | _json,
    "max_tokens": st.integers(-3, 10**9) | _json,
    "n": st.integers(-1, 40) | _json,
    "temperature": st.floats(allow_nan=True) | _json,
    "top_p": _json, "top_k": _json, "seed": st.integers() | _json, "stop": _json,
    "logprobs": st.booleans() | st.integers(-2, 30) | _json, "top_logprobs": _json,
    "tools": st.just(TOOLS) | _json, "tool_choice": st.sampled_from(
        ["auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}]
    ) | _json,
    "response_format": _json, "logit_bias": _json, "stream": _json, "stream_options": _json,
    "echo": _json, "best_of": _json, "surprise": _json,
}  # fmt: skip
_bodies = st.fixed_dictionaries({}, optional=_fields)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, as_chat=st.booleans())
def test_fuzzed_bodies_never_crash_the_request_path(tok, body, as_chat):
    model = ChatCompletionRequest if as_chat else CompletionRequest
    try:
        req = parse_body(json.dumps(body).encode(), model)
        req.sampling(0)
        if as_chat:
            chat_prompt(req, tok)
    except ApiError as e:
        assert e.status in (400, 422) and e.message


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzzed_bytes_are_400_or_422(raw):
    for model in (ChatCompletionRequest, CompletionRequest):
        try:
            parse_body(raw, model)
        except ApiError as e:
            assert e.status in (400, 422)


def test_deep_nesting_is_a_400():
    with pytest.raises(ApiError) as e:
        parse_body(b"[" * 100_000 + b"]" * 100_000, CompletionRequest)
    assert e.value.status == 400


def test_merge_ends_every_choice_when_one_fails_or_the_reader_leaves():
    from cluster.responses import merge

    closed: list[int] = []

    async def choice(i, fail_at=None, n=100):
        try:
            for k in range(n):
                if k == fail_at:
                    raise RuntimeError(f"choice {i} failed")
                yield (i, k)
                await asyncio.sleep(0)
        finally:
            closed.append(i)

    async def fails():
        got = []
        with pytest.raises(RuntimeError, match="choice 1 failed"):
            async for item in merge([choice(0), choice(1, fail_at=3), choice(2)]):
                got.append(item)
        return got

    got = asyncio.run(fails())
    assert sorted(closed) == [0, 1, 2] and (1, 2) in got
    closed.clear()

    async def leaves():
        items = merge([choice(0), choice(1), choice(2)])
        async for item in items:
            if item[1] == 5:
                break
        await items.aclose()

    asyncio.run(leaves())
    assert sorted(closed) == [0, 1, 2]  # every choice's request would be cancelled


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    content=st.text(st.characters(codec="ascii", exclude_characters="<|z\n"), max_size=12),
    args=st.dictionaries(
        st.sampled_from(["city", "unit", "n"]), st.integers() | st.text(max_size=6)
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
    stop=st.sampled_from([[], ["zzz"], ["\n\n\n"]]),
)
def test_tool_call_tokens_in_any_stream_chunks_give_the_same_answer(tok, content, args, cuts, stop):
    """K2's tool-call tokens through the whole output path (incremental detokenizer, stop-string
    holdback, parser), cut into arbitrary token batches."""
    text = content + SECTION_BEGIN[0] + CALL_BEGIN + "functions.get_weather:0" + ARGUMENT_BEGIN
    text += json.dumps(args) + CALL_END + SECTION_END[0]
    ids = tok.encode(text)
    bounds = sorted({0, len(ids), *(c % (len(ids) + 1) for c in cuts)})
    batches = [ids[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    body = chat(tools=TOOLS, stop=stop or None)
    whole = _respond(tok, body, [([ids],)], tool_mode="auto")["choices"][0]
    split = _respond(tok, body, [(batches,)], tool_mode="auto")["choices"][0]
    assert split == whole
    assert whole["message"]["tool_calls"][0]["function"]["arguments"] == json.dumps(args)
    assert (whole["message"]["content"] or "") == content and whole["finish_reason"] == "tool_calls"


def test_a_rejected_later_choice_fails_the_request_and_cancels_the_others(tok):
    """Choice 1's stream fails with a 429 while choice 2's is still starting: the answer is that
    429, and every choice's stream is closed (its request cancelled). (``Flow`` places the
    choices together, so they start or fail together; the ingress does not rely on it.)"""
    from cluster.flow import Started
    from cluster.ingress import Ingress

    closed: list[str] = []

    class FakeFlow:
        async def generate(self, gen):
            try:
                if gen.request_id.endswith(".c1"):
                    await asyncio.sleep(0.01)
                    raise ApiError(429, "overloaded", code="slo", retry_after_s=1.0)
                if gen.request_id.endswith(".c2"):
                    await asyncio.sleep(0.05)
                yield Started(0)
                await asyncio.sleep(10)
            finally:
                closed.append(gen.request_id[-2:])

        def generate_choices(self, request_id, gens):
            return [self.generate(g) for g in gens]

    async def get_flow():
        return FakeFlow()

    ingress = SimpleNamespace(**vars(_ingress(tok)), max_model_len=8192, _get_flow=get_flow)
    ingress.metrics.rejects = _Metric()
    ingress._start = lambda events: Ingress._start(ingress, events)
    body = parse_body(b'{"model": "m", "prompt": "a", "n": 3, "max_tokens": 2}', CompletionRequest)
    with pytest.raises(ApiError) as e:
        asyncio.run(Ingress._serve(ingress, body, [1, 2], "completion", 2))
    assert e.value.status == 429 and sorted(closed) == ["c0", "c1", "c2"]
