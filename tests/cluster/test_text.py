"""TextStream: incremental text with stop strings, on the real k2-tiny tokenizer."""

import pytest

from cluster.text import TextStream


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from model.tokenizer import Tokenizer

    return Tokenizer.load(tiny_model_dir)


def _feed(stream: TextStream, ids: list[int], step: int) -> str:
    out = "".join(stream.add(ids[i : i + step]) for i in range(0, len(ids), step))
    return out + stream.finish()


@pytest.mark.parametrize("step", [1, 3])
def test_deltas_concatenate_to_full_decode(tokenizer, step):
    text = "Tidal serves 42 requests — déjà vu, naïve café. 🌊 ok"
    ids = tokenizer.encode(text)
    assert _feed(TextStream(tokenizer), ids, step) == tokenizer.decode(ids)


@pytest.mark.parametrize("step", [1, 2])
def test_stop_string_is_cut_even_across_tokens(tokenizer, step):
    ids = tokenizer.encode("alpha beta STOP gamma delta")
    stream = TextStream(tokenizer, ["STOP", "never"])
    out = _feed(stream, ids, step)
    assert stream.is_stopped
    assert out == tokenizer.decode(ids).split("STOP")[0]
    assert "STO" not in out


def test_earliest_stop_wins(tokenizer):
    ids = tokenizer.encode("one two three four")
    stream = TextStream(tokenizer, ["four", "two"])
    assert _feed(stream, ids, 50) == "one "
