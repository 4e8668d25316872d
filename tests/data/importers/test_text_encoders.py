"""The optional frozen sentence encoder: registered, and a clear error when it cannot load."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from commlab.config import validate_config
from commlab.models import ENCODERS, build_method
from commlab.models.text_encoders import SentenceEncoderUnavailable


def test_registered() -> None:
    assert "sentence_transformer" in ENCODERS


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SentenceEncoderUnavailable, match="never downloads"):
        ENCODERS.build("sentence_transformer", path=str(tmp_path / "clip-multilingual"))


@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is not None,
    reason="sentence-transformers is installed here",
)
def test_missing_package_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SentenceEncoderUnavailable, match="pip install sentence-transformers"):
        ENCODERS.build("sentence_transformer", path=str(tmp_path))


def test_error_names_the_modality_in_a_model(tmp_path: Path) -> None:
    cfg = validate_config(
        {
            "model": {
                "embed_dim": 16,
                "n_heads": 2,
                "modalities": [
                    {"encoder": {"name": "mlp", "params": {"out_dim": 16}}},
                    {
                        "encoder": {
                            "name": "sentence_transformer",
                            "params": {"path": str(tmp_path / "none")},
                        }
                    },
                ],
            }
        }
    )
    with pytest.raises(ValueError, match="model.modalities.1: sentence encoder directory"):
        build_method(cfg, [(4,), (12,)])
