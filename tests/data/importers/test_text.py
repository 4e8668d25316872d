"""The word tokenizer (deterministic, train-fitted) and the offline pretrained-tokenizer guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from commlab.data.text import MASK_ID, PAD_ID, UNK_ID, PretrainedTokenizer, WordTokenizer, words


def test_words_are_lowercased_nfkc_runs_keeping_inner_apostrophes() -> None:
    assert words("Don't PANIC: ﬁre-fighters, 42!") == ["don't", "panic", "fire", "fighters", "42"]


def test_fit_ranks_by_count_then_alphabetically_and_respects_min_freq() -> None:
    tok = WordTokenizer.fit(["b a c", "a b", "a d", "e"], max_vocab=10, min_freq=2)
    assert tok.vocab == ("<pad>", "<mask>", "<unk>", "a", "b")
    tok = WordTokenizer.fit(["b a c", "a b", "a d", "e"], max_vocab=4, min_freq=1)
    assert tok.vocab == ("<pad>", "<mask>", "<unk>", "a")
    assert (PAD_ID, MASK_ID, UNK_ID) == (0, 1, 2)


def test_encode_truncates_maps_unknown_and_never_returns_empty() -> None:
    tok = WordTokenizer.fit(["x y z"] * 2, min_freq=1, max_length=2)
    assert tok.encode("z x y") == [tok.vocab.index("z"), tok.vocab.index("x")]
    assert tok.encode("q") == [UNK_ID]
    assert tok.encode("   ...  ") == [UNK_ID]
    ids, lengths = tok.encode_batch(["x", "x y z", ""])
    assert ids.dtype == np.int64 and ids.shape == (3, 2)
    assert lengths.tolist() == [1, 2, 1] and ids[0, 1] == PAD_ID


def test_params_round_trip() -> None:
    tok = WordTokenizer.fit(["the cat sat", "the dog"], min_freq=1, max_length=7)
    again = WordTokenizer.from_params(tok.to_params())
    assert again == tok and again.encode("the dog sat") == tok.encode("the dog sat")
    with pytest.raises(ValueError, match="reserved tokens"):
        WordTokenizer(("a", "b", "c"))


def test_pretrained_tokenizer_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist; commlab never downloads"):
        PretrainedTokenizer(tmp_path / "bert-base-uncased")
