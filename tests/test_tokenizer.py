"""K2's real tokenizer files from ../shared/kimi-k2 through tiktoken."""

import pytest

from conftest import SHARED
from hybrid.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def k2():
    return Tokenizer.from_folder(SHARED)


def test_special_token_ids(k2):
    assert k2.n_vocab == 163840
    assert (k2.token_id("[BOS]"), k2.token_id("[EOS]"), k2.token_id("<|im_end|>")) == (163584, 163585, 163586)
    assert k2.token_id("<|im_middle|>") == 163601 and k2.token_id("[PAD]") == 163839
    assert k2.token_id("<|reserved_token_163589|>") == 163589
    assert k2.encode("<|im_user|>user<|im_middle|>")[0] == 163587


@pytest.mark.parametrize("text", ["Hello, world!", "你好，世界。机器学习", "def f(x):\n    return x**2\n",
                                  "emoji 🚀🔥 and    long     whitespace\n\n\n", "ünïcödé Ωμέγα 12345678"])
def test_round_trip(k2, text):
    ids = k2.encode(text)
    assert k2.decode(ids) == text
    assert all(0 <= i < 163584 for i in ids)


def test_no_tokenizer_is_none(tmp_path):
    assert Tokenizer.from_folder(tmp_path) is None


def test_stream_never_splits_a_character(k2):
    from hybrid.streaming import TextStream

    text = "机器学习 🚀🔥 ünïcödé"
    ids = k2.encode(text)
    assert any(len(k2.token_bytes(i).decode("utf-8", errors="ignore")) == 0 for i in ids)  # split characters exist
    stream = TextStream(k2)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)


def test_stream_holds_back_a_stop_string_across_tokens(k2):
    from hybrid.streaming import TextStream

    ids = k2.encode("alpha beta<STOP>gamma")
    stream = TextStream(k2, stop_strings=["<STOP>"])
    out = ""
    for i in ids:
        out += stream.push(i)
        if stream.stopped:
            break
    assert stream.stopped and out == "alpha beta" and stream.flush() == ""
