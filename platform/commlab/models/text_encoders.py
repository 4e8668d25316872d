"""Optional frozen text encoder: a sentence-transformers model the user already has on disk.

The paper's MM-IMDb text encoder is a frozen sentence-transformers model returning token
embeddings and an attention mask. Here it is `sentence_transformer` with `path` = a local model
directory; it needs the `sentence-transformers` package and runs offline (HF_HUB_OFFLINE=1), so
it never downloads. Its input must be token ids from that model's own tokenizer: import MM-IMDb
with `tokenizer_path` = the same directory. Without a local model, use the trainable `embedding`
encoder on the built-in word tokenizer instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from commlab.models.encoders import ENCODERS


class SentenceEncoderUnavailable(ValueError):
    """The frozen sentence encoder cannot be built here (missing package or model directory)."""


def load_sentence_model(path: str | Path) -> Any:
    """A SentenceTransformer loaded from the local directory `path`, never from the network."""
    path = Path(path)
    if not path.is_dir():
        raise SentenceEncoderUnavailable(
            f"sentence encoder directory {path} does not exist; commlab never downloads models. "
            "Copy a sentence-transformers model there, or use the trainable 'embedding' encoder."
        )
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise SentenceEncoderUnavailable(
            "the 'sentence_transformer' encoder needs the sentence-transformers package "
            "(pip install sentence-transformers), or use the trainable 'embedding' encoder"
        ) from None
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    return SentenceTransformer(str(path), device="cpu")


@ENCODERS.register("sentence_transformer")
class FrozenSentenceEncoder(nn.Module):
    """Token ids (B, L) of the model's own tokenizer -> frozen token embeddings (B, L, d).

    The padding mask (True = pad) is passed through; `out_dim` is the transformer width.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        st = load_sentence_model(path)
        self.transformer = st[0].auto_model
        self.transformer.requires_grad_(False)
        self.transformer.eval()
        self.out_dim = int(self.transformer.config.hidden_size)

    def train(self, mode: bool = True) -> FrozenSentenceEncoder:
        super().train(mode)
        self.transformer.eval()  # frozen: dropout stays off in pretraining too
        return self

    def forward(self, x: Tensor, pad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        attention = None if pad is None else (~pad).long()
        with torch.no_grad():
            h = self.transformer(input_ids=x, attention_mask=attention).last_hidden_state
        return h, pad
