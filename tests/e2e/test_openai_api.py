"""What agent frameworks send, through the openai client and 1 prefill + 1 decode instance:
tools (whole and streamed), the K2 model-card tool loop, logprobs, n choices, unknown fields,
and fuzzed HTTP bodies.

k2-tiny has random weights, so it never calls a tool of its own accord. A named
``tool_choice`` makes the ingress open that call in the prompt (``functions.NAME:0`` and the
argument marker), so the served answer always holds that call, with whatever arguments the
model writes: the parser, the response shapes and the stream run for real. The parser's
grammar itself (whole, split, malformed) is tested in tests/cluster/test_tool_calls.py.
"""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.ingress import chat_prompt, parse_body
from cluster.protocol import ChatCompletionRequest
from common.sampling import SamplingParams
from tests.e2e.conftest import (
    MODEL_NAME,
    assert_idle_pages,
    deployed,
    make_prompt,
    pools,
    wait_for,
)

APP = "openai-api"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Oslo?"},
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
GREEDY = {"temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def url(serve_url, tiny_model_dir):
    with deployed(
        serve_url, tiny_model_dir, APP, prefill=1, decode=1, decode_local_threshold=16
    ) as u:
        yield u


@pytest.fixture()
def client(url, client_factory):
    return client_factory(url)


def prompt_len(tok, **body) -> int:
    req = parse_body(json.dumps({"model": "m", **body}).encode(), ChatCompletionRequest)
    return len(chat_prompt(req, tok)[0])


# ---- tools ----------------------------------------------------------------------------------
def test_tools_are_rendered_and_a_named_call_comes_back(client, reference_engine):
    tok = reference_engine.tokenizer
    plain = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY)
    auto = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="auto", **GREEDY
    )
    assert plain.usage.prompt_tokens == prompt_len(tok, messages=MESSAGES)
    assert auto.usage.prompt_tokens == prompt_len(tok, messages=MESSAGES, tools=TOOLS)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the tool_declare turn
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="none", **GREEDY
    )
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None

    named = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, **GREEDY
    )
    (call,) = named.choices[0].message.tool_calls
    assert call.id == "functions.get_weather:0" and call.type == "function"
    assert call.function.name == "get_weather"
    assert named.choices[0].finish_reason in ("length", "tool_calls")
    required = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required", **GREEDY
    )
    assert required.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_streamed_tool_call_matches_the_whole_answer(client):
    kw = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, **GREEDY)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                if tc.id is not None:  # the first delta of a call: id, type and name
                    assert tc.index not in calls and tc.type == "function"
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                calls[tc.index]["arguments"] += tc.function.arguments or ""
    assert finish == whole.finish_reason
    assert content == (whole.message.content or "")
    assert list(calls.values()) == [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in whole.message.tool_calls
    ]


def test_the_model_card_tool_loop_runs_unchanged(client):
    """Kimi-K2's model card: call with tools, append the assistant message as returned, answer
    each call with a tool message (tool_call_id and name), call again."""
    messages = list(MESSAGES)
    first = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, tools=TOOLS, tool_choice=NAMED, **GREEDY
    )
    choice = first.choices[0]
    messages.append(choice.message)  # the SDK's own object, every field it carries
    for call in choice.message.tool_calls:
        messages.append(
            {"role": "tool", "tool_call_id": call.id, "name": call.function.name,
             "content": json.dumps({"city": "Oslo", "weather": "12C, rain"})}
        )  # fmt: skip
    second = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, tools=TOOLS, tool_choice="auto", **GREEDY
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


# ---- logprobs -------------------------------------------------------------------------------
def test_chat_logprobs_greedy_is_the_top_one_streamed_and_not(client):
    kw = dict(
        model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True,
        top_logprobs=3, extra_body={"ignore_eos": True},
    )  # fmt: skip
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the most likely token
        assert entry.token == entry.top_logprobs[0].token and entry.logprob <= 0
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = [
        e
        for chunk in client.chat.completions.create(**kw, stream=True)
        for c in chunk.choices
        for e in (c.logprobs.content if c.logprobs and c.logprobs.content else [])
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    for a, b in zip(streamed, content, strict=True):
        assert math.isclose(a.logprob, b.logprob, abs_tol=1e-4)
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == r.choices[0].message.content


def test_completion_logprobs_match_the_offline_tokens(client, reference_engine):
    prompt = make_prompt(40, seed=21)  # through the prefill instance: its first logprob too
    r = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == reference_engine.generate([prompt], 5)[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for token_lp, tops in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(tops) <= 2 and math.isclose(token_lp, max(tops.values()), abs_tol=0)


# ---- n choices ------------------------------------------------------------------------------
def test_n_choices_each_draw_with_seed_plus_index(client, url, reference_engine):
    prompt = make_prompt(40, seed=22)
    kw = dict(model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=1.0)
    extra = {"ignore_eos": True, "return_token_ids": True}
    r = client.completions.create(**kw, n=3, seed=5, extra_body=extra)
    assert [c.index for c in r.choices] == [0, 1, 2]
    got = [c.model_extra["token_ids"] for c in r.choices]
    for i, ids in enumerate(got):
        sampling = SamplingParams(temperature=1.0, seed=5 + i)
        assert ids == reference_engine.generate([prompt], 5, sampling)[0], f"choice {i}"
    assert r.usage.completion_tokens == 15 and r.usage.prompt_tokens == len(prompt)

    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=4, n=3, seed=1, stream=True,
            logprobs=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    finishes = {c.index: c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason}
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].usage.completion_tokens == 12
    assert_idle_pages(url)


def test_disconnecting_from_n_streamed_choices_frees_them_all(url):
    body = {
        "model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 3000, "n": 3, "stream": True,
        "temperature": 0, "ignore_eos": True,
    }  # fmt: skip
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = set()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen.update(c["index"] for c in json.loads(line[6:])["choices"])
                if len(seen) == 3:
                    break  # every choice is generating: go away mid-stream
    assert_idle_pages(url)


def test_n_choices_run_one_prefill_and_fork_on_decode(client, url):
    def on_prefill(key: str) -> int:
        snap = pools(url)
        return sum(i["stats"][key] for i in snap["instances"] if i["role"] == "prefill")

    prompt = make_prompt(200, seed=23)  # three full 64-token blocks and 8 tokens
    before = on_prefill("num_prompt_tokens")
    r = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0, n=3,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert len({tuple(c.model_extra["token_ids"]) for c in r.choices}) == 1  # greedy: all alike
    # one prompt prefilled for three choices (the stats arrive with the next report)
    wait_for(lambda: on_prefill("num_prompt_tokens") > before, timeout_s=10, what="prefill")
    time.sleep(0.5)  # several report intervals: a second or third prefill would show by now
    assert on_prefill("num_prompt_tokens") - before == len(prompt)
    assert_idle_pages(url)


# ---- fields ---------------------------------------------------------------------------------
def test_unknown_fields_are_accepted_and_unhonourable_ones_named(client, url):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=2,
        extra_body={"reasoning_effort": "low", "store": False, "metadata": {"k": "v"},
                    "some_future_field": [1, 2]},
    )  # fmt: skip
    assert r.choices[0].message.role == "assistant"
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {}}}}  # fmt: skip
    bad = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"


# ---- fuzzing the HTTP bodies ----------------------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "nobody"]),
     "content": st.text(max_size=20) | _json},
    optional={"tool_call_id": st.text(max_size=8), "tool_calls": _json, "name": _json},
)  # fmt: skip
_body = st.fixed_dictionaries(
    {
        # generation stays short: the fuzz is about bodies, not decode time
        "max_tokens": st.sampled_from([1, 2, 0, -1, "x", 10**9, 2.5]),
    },
    optional={
        "model": st.just(MODEL_NAME) | _json,
        "messages": st.lists(_message, min_size=1, max_size=2) | _json,
        "prompt": st.text(max_size=20) | st.lists(st.integers(-2, 600), max_size=4) | _json,
        "n": st.sampled_from([1, 2, 0, 17, "2"]),
        "stream": st.booleans() | _json,
        "temperature": st.floats(allow_nan=False) | _json,
        "logprobs": st.booleans() | st.integers(-1, 25) | _json,
        "top_logprobs": st.integers(-1, 25) | _json,
        "tools": st.just(TOOLS) | _json,
        "tool_choice": st.sampled_from(["auto", "none", "required", NAMED]) | _json,
        "stop": _json, "seed": _json, "stream_options": _json, "response_format": _json,
        "logit_bias": _json, "unknown_thing": _json,
    },
)  # fmt: skip


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=_body, route=st.sampled_from(["chat/completions", "completions"]))
def test_fuzzed_bodies_get_an_answer_or_an_openai_error(url, body, route):
    body.setdefault("model", MODEL_NAME)
    with httpx.Client(timeout=60) as http:
        # Python's JSON writes NaN and Infinity, which the server's parser reads: fuzzed too
        content = json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        with http.stream("POST", f"{url}/v1/{route}", content=content, headers=headers) as r:
            text = r.read().decode()
    assert r.status_code in (200, 400, 404, 413, 422, 429), (r.status_code, text)
    if r.status_code != 200:
        error = json.loads(text)["error"]
        assert error["message"] and error["type"]
    elif text.startswith("data:"):
        assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text


def test_fuzzing_left_nothing_behind(url):
    assert_idle_pages(url)
