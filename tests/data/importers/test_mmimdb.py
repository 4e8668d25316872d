"""MM-IMDb: genres, plots and tokens, posters, malformed sources, pretraining."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from commlab.data.importers import import_dataset
from commlab.data.importers.mmimdb import GENRES
from commlab.data.parquet import read_dataset, read_schema, validate_dataset
from commlab.data.text import UNK_ID, WordTokenizer

from .fixtures import MMIMDB_GENRES, pretrain_one_epoch, write_mmimdb
from .helpers import assert_import_fails, assert_trained, same_files


@pytest.fixture
def mmimdb(tmp_path: Path) -> Path:
    return write_mmimdb(tmp_path / "mmimdb")


def _movies(root: Path) -> list[str]:
    split = json.loads((root / "split.json").read_text())
    return split["train"] + split["dev"] + split["test"]


def _meta(root: Path, movie: str) -> dict:
    return json.loads((root / "dataset" / f"{movie}.json").read_text())


def _write_meta(root: Path, movie: str, meta: dict) -> Path:
    path = root / "dataset" / f"{movie}.json"
    path.write_text(json.dumps(meta))
    return path


def test_import_genres_text_images(mmimdb: Path, tmp_path: Path) -> None:
    out = import_dataset("mmimdb", mmimdb, tmp_path / "ds", image_size=32, progress=False)
    assert validate_dataset(out) == []
    ds = read_dataset(out)
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [16, 6, 6]
    assert len(GENRES) == 23 and list(GENRES) == sorted(GENRES)
    assert ds.tasks["genres"].kind == "multilabel" and ds.tasks["genres"].num_classes == 23
    movies = _movies(mmimdb)
    for i in (0, 5, 27):
        expected = torch.zeros(23, dtype=torch.long)
        for g in _meta(mmimdb, movies[i])["genres"]:
            expected[GENRES.index(g.lower())] = 1
        assert torch.equal(ds.labels["genres"][i], expected)
    image, text = ds.modalities
    assert image.kind == "image" and tuple(image.values.shape[1:]) == (3, 32, 32)
    assert image.values.dtype == torch.uint8
    assert text.kind == "text" and text.values.dtype == torch.int64
    tok = WordTokenizer.from_params(read_schema(out)["params"]["tokenizer"])
    first_plot = _meta(mmimdb, movies[3])["plot"][0]
    ids = tok.encode(first_plot)
    assert text.values[3, : len(ids)].tolist() == ids and int(text.lengths[3]) == len(ids)


def test_vocabulary_comes_from_train_plots_only(mmimdb: Path, tmp_path: Path) -> None:
    test_movie = _movies(mmimdb)[-1]
    meta = _meta(mmimdb, test_movie)
    meta["plot"][0] = "zebracorn " * 5 + meta["plot"][0]
    _write_meta(mmimdb, test_movie, meta)
    out = import_dataset("mmimdb", mmimdb, tmp_path / "ds", image_size=16, progress=False)
    params = read_schema(out)["params"]["tokenizer"]
    assert "zebracorn" not in params["vocab"]
    assert params["vocab"][:3] == ["<pad>", "<mask>", "<unk>"]
    assert read_dataset(out).modalities[1].values[-1, 0] == UNK_ID


def test_plot_choice_longest(mmimdb: Path, tmp_path: Path) -> None:
    out = import_dataset(
        "mmimdb", mmimdb, tmp_path / "ds", image_size=16, plot="longest", max_length=512,
        progress=False,
    )  # fmt: skip
    ds = read_dataset(out)
    tok = WordTokenizer.from_params(read_schema(out)["params"]["tokenizer"])
    movie = _movies(mmimdb)[2]
    longest = max(_meta(mmimdb, movie)["plot"], key=len)
    assert int(ds.modalities[1].lengths[2]) == len(tok.encode(longest))


def test_converting_twice_gives_identical_files(mmimdb: Path, tmp_path: Path) -> None:
    a = import_dataset("mmimdb", mmimdb, tmp_path / "a", image_size=24, progress=False)
    b = import_dataset("mmimdb", mmimdb, tmp_path / "b", image_size=24, workers=1, progress=False)
    assert same_files(a, b)


def test_unknown_genre_is_an_error_unless_ignored(mmimdb: Path, tmp_path: Path) -> None:
    movie = _movies(mmimdb)[7]
    meta = _meta(mmimdb, movie)
    meta["genres"].append("Reality-TV")
    path = _write_meta(mmimdb, movie, meta)
    assert_import_fails(
        "mmimdb", mmimdb, tmp_path / "out", str(path), "[genres]", "reality-tv", image_size=16
    )
    out = import_dataset(
        "mmimdb", mmimdb, tmp_path / "ok", image_size=16, unknown_genres="ignore", progress=False
    )
    assert int(read_dataset(out).labels["genres"][7].sum()) == 2


def test_missing_poster(mmimdb: Path, tmp_path: Path) -> None:
    poster = mmimdb / "dataset" / f"{_movies(mmimdb)[20]}.jpeg"
    poster.unlink()
    assert_import_fails("mmimdb", mmimdb, tmp_path / "out", str(poster), "not found", image_size=16)


def test_corrupt_poster(mmimdb: Path, tmp_path: Path) -> None:
    poster = mmimdb / "dataset" / f"{_movies(mmimdb)[4]}.jpeg"
    poster.write_bytes(poster.read_bytes()[:40])
    assert_import_fails("mmimdb", mmimdb, tmp_path / "out", str(poster), "unreadable image")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m.pop("plot"), ("[plot]", "missing key")),
        (lambda m: m.update(plot="a plain string"), ("[plot]", "list of strings")),
        (lambda m: m.update(plot=[]), ("[plot]", "non-empty")),
        (lambda m: m.update(genres="Drama"), ("[genres]", "list of strings")),
    ],
)
def test_malformed_movie_json(change, words, mmimdb: Path, tmp_path: Path) -> None:
    movie = _movies(mmimdb)[9]
    meta = _meta(mmimdb, movie)
    change(meta)
    path = _write_meta(mmimdb, movie, meta)
    assert_import_fails("mmimdb", mmimdb, tmp_path / "out", str(path), *words, image_size=16)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda s: s.pop("dev"), ("[dev]", "missing key")),
        (lambda s: s.update(dev=[]), ("[dev]", "split is empty")),
        (lambda s: s["test"].append(s["train"][0]), ("[test]", "listed twice")),
    ],
)
def test_malformed_split_file(change, words, mmimdb: Path, tmp_path: Path) -> None:
    path = mmimdb / "split.json"
    split = json.loads(path.read_text())
    change(split)
    path.write_text(json.dumps(split))
    assert_import_fails("mmimdb", mmimdb, tmp_path / "out", str(path), *words)


def test_missing_split_file(mmimdb: Path, tmp_path: Path) -> None:
    (mmimdb / "split.json").unlink()
    assert_import_fails("mmimdb", mmimdb, tmp_path / "out", "split.json", "not found")


def test_missing_pretrained_tokenizer_is_a_clear_error(mmimdb: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="never downloads"):
        import_dataset(
            "mmimdb", mmimdb, tmp_path / "out", tokenizer_path=str(tmp_path / "no-model"),
            progress=False,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_fixture_genre_spellings_are_known() -> None:
    assert all(g.lower() in GENRES for g in MMIMDB_GENRES)


def test_pretrain_one_epoch_on_imported_mmimdb(mmimdb: Path, tmp_path: Path) -> None:
    out = import_dataset("mmimdb", mmimdb, tmp_path / "ds", image_size=32, progress=False)
    vocab = read_schema(out)["params"]["tokenizer"]["vocab_size"]
    tiny = [
        "model.embed_dim=16",
        "optim.warmup_epochs=0",
        "model.modalities.0.encoder.params.width=8",
        "model.modalities.0.encoder.params.out_channels=16",
        f"model.modalities.1.encoder.params.vocab_size={vocab}",
        "model.modalities.1.encoder.params.dim=16",
        "model.modalities.1.encoder.params.n_layers=1",
    ]
    metrics = pretrain_one_epoch(out, "mmimdb", tiny)
    assert_trained(metrics, "probe/genres/f1_macro", "probe/genres/f1_weighted")
