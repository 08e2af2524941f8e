"""--colocated: one mixed instance runs chunked prefill interleaved with decode, no transfer.
Greedy output must be token-identical to the offline engine, as in disaggregated mode."""

import httpx
import pytest

from tests.e2e.conftest import MODEL_NAME, completion_ids, deployed, make_prompt, stream_ids

APP = "coloc"


@pytest.fixture(scope="module")
def url(serve_url, tiny_model_dir):
    with deployed(serve_url, tiny_model_dir, APP, colocated=1) as u:
        yield u


@pytest.fixture()
def client(url, client_factory):
    return client_factory(url)


def test_only_mixed_instances(url):
    assert httpx.get(f"{url}/health").json()["serving"] == {"prefill": 0, "decode": 0, "mixed": 1}


def test_greedy_matches_offline(client, greedy_cases):
    for prompt, expected in greedy_cases:
        r = completion_ids(client, prompt)
        assert r.choices[0].model_extra["token_ids"] == expected, f"prompt of {len(prompt)} tokens"
    for prompt, expected in greedy_cases[1:3]:
        ids, _, usage = stream_ids(client, prompt)
        assert ids == expected and usage.prompt_tokens == len(prompt)


def test_concurrent_requests_batch_and_match(client, reference_engine):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [make_prompt(n, 200 + n) for n in (7, 33, 90, 600)]
    expected = [reference_engine.generate([p], 10)[0] for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: completion_ids(client, p, 10), prompts))
    assert [g.choices[0].model_extra["token_ids"] for g in got] == expected


def test_chat(client, reference_engine):
    tok = reference_engine.tokenizer
    messages = [{"role": "user", "content": "Colocated hello"}]
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=5,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    assert r.choices[0].model_extra["token_ids"] == reference_engine.generate([prompt], 5)[0]
