"""Long requests through 1 prefill + 1 decode instance: a 32K-token prompt gives the offline
engine's greedy tokens, and requests too long for the model or for the decode KV are refused
with the numbers.

The 32K prompt costs about a minute and a half of one core on k2-tiny (its attention is
quadratic); the offline reference runs in a thread at the same time, on the other core.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.e2e.conftest import MODEL_NAME, assert_idle_pages, deployed, make_prompt

APP = "longctx"
LONG_LEN = 32_768
MAX_TOKENS = 4
KV_TOKENS = 34_816  # per rank, both roles: the 32K request and a little more
MAX_MODEL_LEN = 262_144  # k2-tiny's max_position_embeddings


@pytest.fixture(scope="module")
def url(serve_url, tiny_model_dir):
    with deployed(
        serve_url, tiny_model_dir, APP, prefill=1, decode=1,
        prefill_kv_tokens=KV_TOKENS, decode_kv_tokens=KV_TOKENS,
        transfer_idle_timeout_s=30.0,
    ) as u:  # fmt: skip
        yield u


@pytest.mark.timeout(1200)
def test_32k_prompt_matches_offline(url, tiny_model_dir):
    from model import Engine

    prompt = make_prompt(LONG_LEN, 11)
    expected: dict[str, list[int]] = {}

    def reference() -> None:
        engine = Engine.load(tiny_model_dir, max_num_tokens=LONG_LEN + MAX_TOKENS)
        expected["ids"] = engine.generate([prompt], MAX_TOKENS)[0]

    offline = threading.Thread(target=reference)
    offline.start()
    t0 = time.monotonic()
    r = httpx.post(
        f"{url}/v1/completions",
        json={
            "model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True,
        },
        timeout=900,  # minutes on a busy 2-core box; ~1.5 min of one idle core
    )  # fmt: skip
    assert r.status_code == 200, r.text
    served = r.json()["choices"][0]["token_ids"]
    served_s = time.monotonic() - t0
    offline.join()
    print(f"32K prompt served in {served_s:.0f} s")
    assert served == expected["ids"], f"served in {served_s:.0f} s"
    assert_idle_pages(url)


def test_prompt_over_max_model_len_is_400_with_both_numbers(url):
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": MODEL_NAME, "prompt": [7] * (MAX_MODEL_LEN + 1)},
        timeout=120,
    )
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert str(MAX_MODEL_LEN + 1) in message and str(MAX_MODEL_LEN) in message


def test_request_larger_than_a_decode_rank_is_refused_with_the_numbers(url):
    """Within max_model_len, but prompt + max_tokens exceed every decode rank's KV."""
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": MODEL_NAME, "prompt": make_prompt(100, 12), "max_tokens": 40_000},
        timeout=60,
    )
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "40100" in message and str(KV_TOKENS) in message
