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
