"""Text to token ids for the trainable `embedding` encoder, and an optional local pretrained one.

`WordTokenizer` is deliberately simple and fully deterministic: NFKC-normalised, lower-cased
words (`\\w+` runs, inner apostrophes kept), a vocabulary of the most frequent training words
(ties broken alphabetically), three reserved ids: 0 = pad, 1 = mask (the default
`TextAugmentConfig.mask_token_id`), 2 = unknown. Its whole state is `to_params()`, stored in
the dataset schema, so new text can be tokenised identically with `WordTokenizer.from_params`.

`PretrainedTokenizer` wraps a tokenizer directory the user already has (e.g. the one inside a
sentence-transformers model), loaded offline; it never downloads.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PAD, MASK, UNK = "<pad>", "<mask>", "<unk>"
SPECIALS = (PAD, MASK, UNK)
PAD_ID, MASK_ID, UNK_ID = 0, 1, 2
_WORD = re.compile(r"\w+(?:'\w+)*")


def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id lists into (N, L) int64 with L the longest; returns (ids, lengths)."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    width = max(1, int(lengths.max()) if len(seqs) else 1)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    return ids, lengths


@dataclass(frozen=True)
class WordTokenizer:
    vocab: tuple[str, ...]
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.vocab[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"vocab must start with the reserved tokens {SPECIALS}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        object.__setattr__(self, "_ids", {w: i for i, w in enumerate(self.vocab)})

    @classmethod
    def fit(
        cls, texts: Iterable[str], max_vocab: int = 30_000, min_freq: int = 2, max_length: int = 256
    ) -> WordTokenizer:
        """The `max_vocab - 3` most frequent words seen at least `min_freq` times."""
        if max_vocab <= len(SPECIALS):
            raise ValueError(f"max_vocab must exceed {len(SPECIALS)}, got {max_vocab}")
        counts = Counter(w for t in texts for w in words(t))
        ranked = sorted(
            (w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w)
        )
        return cls(SPECIALS + tuple(ranked[: max_vocab - len(SPECIALS)]), max_length)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def mask_id(self) -> int:
        return MASK_ID

    def encode(self, text: str) -> list[int]:
        """Ids of the first `max_length` words; an empty text becomes [unk] so that no sample is
        all padding (attention over zero tokens is undefined)."""
        ids: dict[str, int] = self._ids  # type: ignore[attr-defined]
        out = [ids.get(w, UNK_ID) for w in words(text)[: self.max_length]]
        return out or [UNK_ID]

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return pad_batch([self.encode(t) for t in texts], PAD_ID)

    def to_params(self) -> dict[str, Any]:
        return {
            "kind": "word",
            "vocab": list(self.vocab),
            "vocab_size": len(self.vocab),
            "max_length": self.max_length,
            "pad_token_id": PAD_ID,
            "mask_token_id": MASK_ID,
            "unk_token_id": UNK_ID,
        }

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> WordTokenizer:
        if params.get("kind") != "word":
            raise ValueError(f"not a word tokenizer: kind={params.get('kind')!r}")
        return cls(tuple(params["vocab"]), int(params["max_length"]))


class PretrainedTokenizer:
    """A HuggingFace tokenizer from a local directory (offline; needs `transformers`)."""

    def __init__(self, path: str | Path, max_length: int = 128) -> None:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(
                f"pretrained tokenizer directory {path} does not exist; commlab never downloads "
                "models: point to a local copy, or leave it out to use the built-in word tokenizer"
            )
        try:  # lazy: transformers is optional (and slow to import)
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(
                "a pretrained tokenizer needs the 'transformers' package (pip install "
                "sentence-transformers); leave it out to use the built-in word tokenizer"
            ) from None
        os.environ["HF_HUB_OFFLINE"] = "1"
        self.name = path.name
        self.max_length = max_length
        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if self.tok.pad_token_id is None:
            raise ValueError(f"tokenizer in {path} defines no pad token")

    @property
    def pad_id(self) -> int:
        return int(self.tok.pad_token_id)

    @property
    def mask_id(self) -> int:
        mask = self.tok.mask_token_id
        return int(mask if mask is not None else self.tok.unk_token_id)

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tok(list(texts), truncation=True, max_length=self.max_length)
        return pad_batch(enc["input_ids"], self.pad_id)

    def to_params(self) -> dict[str, Any]:
        return {
            "kind": "pretrained",
            "name": self.name,
            "vocab_size": len(self.tok),
            "max_length": self.max_length,
            "pad_token_id": self.pad_id,
            "mask_token_id": self.mask_id,
        }
