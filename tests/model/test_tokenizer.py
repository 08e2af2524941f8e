"""Tokenizer: both file formats, UTF-8 safe streaming, and the chat template."""

import json
import shutil

import pytest

from model.tokenizer import MAX_RUN_CHARS, Tokenizer, TokenizerError, _bounded_runs
from model.tokenizer_files import write_tiktoken_files

TEXTS = [
    "Hello, world!",
    "the capital of France is Paris",
    "héllo wörld: ünïcödé ß",
    "你好，世界。中文分词",
    "emoji 🙂🚀 and a ZWJ family 👨‍👩‍👧",
    "  leading spaces\n\ttabs\r\nand newlines\n\n",
    "numbers 1234567 3.14159",
    "",
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.load(tiny_model_dir)


@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory, tiny_model_dir):
    """Kimi's layout: tiktoken.model + tokenizer_config.json (+ generation_config.json)."""
    d = tmp_path_factory.mktemp("tiktoken")
    write_tiktoken_files(d)
    shutil.copy(tiny_model_dir / "generation_config.json", d)
    return d


@pytest.fixture(scope="module")
def tt(tiktoken_dir):
    return Tokenizer.load(tiktoken_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_merges_compress_common_words(tok):
    assert len(tok.encode("the capital of the system")) <= 8


def test_special_tokens_encode_to_single_ids_and_none_are_added(tok):
    im_end = tok.token_to_id("<|im_end|>")
    assert tok.encode("<|im_end|>") == [im_end]
    ids = tok.encode("hi<|im_user|>there")
    assert tok.token_to_id("<|im_user|>") in ids
    assert tok.bos_token_id not in tok.encode("hi")
    assert tok.decode(ids) == "hi<|im_user|>there"


def test_eos_and_bos_ids(tok):
    assert tok.bos_token_id == tok.token_to_id("[BOS]")
    assert set(tok.eos_token_ids) == {tok.token_to_id("[EOS]"), tok.token_to_id("<|im_end|>")}
    assert tok.vocab_size == 512


def test_partial_utf8_decodes_to_replacement_not_an_error(tok):
    ids = tok.encode("你")
    assert len(ids) > 1  # a 3-byte character spans several byte tokens
    assert "\ufffd" in tok.decode(ids[:-1])


@pytest.mark.parametrize("which", ["tok", "tt"])
@pytest.mark.parametrize("text", TEXTS[2:5])
def test_decode_stream_never_splits_a_character(request, which, text):
    t = request.getfixturevalue(which)
    stream = t.decode_stream()
    pieces = [stream.step(i) for i in t.encode(text)]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens were held back until their character completed


def test_decode_stream_flushes_invalid_bytes(tok):
    stream = tok.decode_stream()
    head = tok.encode("你")[:-1]  # an incomplete 3-byte sequence
    assert [stream.step(i) for i in head] == [""] * len(head)
    assert stream.step(tok.encode("a")[0]).endswith("a")
    assert stream.flush() == ""


def test_chat_template_all_roles(tok):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get", "arguments": {"q": 1}}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Thanks"}, {"type": "text", "text": "!"}],
        },
    ]
    text = tok.apply_chat_template(messages)
    assert text == (
        "<|im_system|>system<|im_middle|>You are terse.<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|>"
        '<|tool_call_begin|>c1<|tool_call_argument_begin|>{"q": 1}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of c1\nsunny<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>Sunny.<|im_end|>"
        "<|im_user|>user<|im_middle|>Thanks!<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    ids = tok.encode(text)
    assert ids[0] == tok.token_to_id("<|im_system|>")
    assert ids[-1] == tok.token_to_id("<|im_middle|>")


def test_chat_template_declares_tools_and_numbers_calls_like_k2(tok):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    calls = [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
    ]
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "20C"},
    ]
    text = tok.apply_chat_template(messages, tools=tools)
    declared = "<|im_system|>tool_declare<|im_middle|>" + json.dumps(tools, ensure_ascii=False)
    assert text.startswith(declared + "<|im_end|><|im_user|>user<|im_middle|>Weather?<|im_end|>")
    assert (
        "<|im_assistant|>assistant<|im_middle|>Checking.<|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Oslo"}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1'
    ) in text
    assert "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:1\n20C" in text
    assert tok.apply_chat_template(messages[:1], tools=[]) == tok.apply_chat_template(messages[:1])
    # every marker is one special token
    for marker in ("<|tool_calls_section_begin|>", "<|tool_call_argument_begin|>"):
        assert tok.encode(marker) == [tok.token_to_id(marker)]


def test_chat_template_without_generation_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert text == "<|im_user|>user<|im_middle|>hi<|im_end|>"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "wizard", "content": "x"}], r"messages\[0\]: unknown role 'wizard'"),
        ([{"role": "user"}], r"messages\[0\] \(role 'user'\) has no 'content'"),
        ([{"role": "user", "content": 5}], r"'content' must be a string"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text content parts"),
        (["hello"], r"messages\[0\] must be an object"),
        ([], "messages is empty"),
    ],
)
def test_chat_template_rejects_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_tiktoken_model_file_format(tiktoken_dir):
    lines = (tiktoken_dir / "tiktoken.model").read_text().splitlines()
    token, rank = lines[ord("A")].split()
    assert (token, rank) == ("QQ==", "65")  # base64 of b"A", rank 65
    cfg = json.loads((tiktoken_dir / "tokenizer_config.json").read_text())
    assert cfg["added_tokens_decoder"]["498"]["content"] == "<|im_end|>"


@pytest.mark.parametrize("text", TEXTS)
def test_tiktoken_round_trip(tt, text):
    assert tt.decode(tt.encode(text)) == text


def test_tiktoken_specials_and_chat_template(tt, tok):
    assert tt.vocab_size == tok.vocab_size
    assert tt.bos_token_id == tok.bos_token_id and tt.eos_token_ids == tok.eos_token_ids
    prompt = tt.apply_chat_template([{"role": "user", "content": "hi"}])
    ids = tt.encode(prompt)
    assert ids[0] == tt.token_to_id("<|im_user|>") == tok.token_to_id("<|im_user|>")
    assert tt.token_to_id("<|im_end|>") in ids
    assert tt.decode(ids) == prompt


def test_tiktoken_uses_kimis_pretokenisation(tt):
    # Digits are split in groups of at most three, and Han runs apart from Latin words.
    pieces = [tt.decode([i]) for i in tt.encode("1234567")]
    ends = {sum(len(p) for p in pieces[: k + 1]) for k in range(len(pieces))}
    assert {3, 6, 7} <= ends and max(len(p) for p in pieces) <= 3
    mixed = tt.encode("abc你好")
    assert tt.decode(mixed[:1]) in ("a", "ab", "abc")
    assert "abc" in {tt.decode(mixed[: k + 1]) for k in range(len(mixed))}


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="expected tokenizer.json or tiktoken.model"):
        Tokenizer.load(tmp_path)


def test_malformed_tiktoken_line(tmp_path):
    (tmp_path / "tiktoken.model").write_text("QQ== 0\nnot-base64!! x\n")
    with pytest.raises(TokenizerError, match=r"tiktoken.model:2: expected '<base64 token> <rank>'"):
        Tokenizer.load(tmp_path)


def test_tiktoken_long_unbroken_run_round_trips(tt):
    text = "ab" * 30_000 + " " * 30_000 + "<|im_end|>" + "z" * 10
    ids = tt.encode(text)
    assert tt.decode(ids) == text
    assert tt.token_to_id("<|im_end|>") in ids


def test_bounded_runs_cut_long_runs_only():
    text = "a" * 60_000 + " b " + " " * 30_000 + "xy"
    runs = _bounded_runs(text)
    assert "".join(runs) == text
    assert max(len(r) for r in runs) <= 2 * MAX_RUN_CHARS
    assert _bounded_runs("short text") == ["short text"]


@pytest.mark.parametrize("which", ["tok", "tt"])
def test_ids_past_the_vocabulary_decode_to_nothing(request, which):
    t = request.getfixturevalue(which)
    assert t.decode([*t.encode("ok"), t.vocab_size + 100]) == "ok"
