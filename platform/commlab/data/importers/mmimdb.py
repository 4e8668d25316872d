"""MM-IMDb (`split.json` + `dataset/{id}.json` + `dataset/{id}.jpeg`) -> a dataset.

Source (notes §6.4): `split.json` maps `train`, `dev`, `test` to lists of movie ids; each
`{id}.json` holds `plot` (a list of strings) and `genres` (a list of strings); `{id}.jpeg` is the
poster. The json/jpeg files sit in `dataset/` next to `split.json` (or beside it).

Decisions, all recorded in the schema params:
- one plot per movie, chosen deterministically (`plot="first"` or `"longest"`; the reference
  drew a random one on every access, evaluation included);
- text is stored as token ids (right-padded, with lengths) from a `WordTokenizer` fitted on the
  TRAIN plots only (its vocabulary is in the params), or from a local pretrained tokenizer
  (`tokenizer_path`) for the frozen sentence encoder;
- posters are converted to RGB, resized (shorter side) and centre-cropped to `image_size`,
  stored uint8 (3, S, S);
- labels: `genres`, multi-hot over the 23 genres in alphabetical order (the reference's
  MultiLabelBinarizer order). A genre outside them is an error naming the file
  (`unknown_genres="ignore"` drops it silently, as the reference does).
Splits: train / val (from `dev`) / test, samples in split.json order.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from rich.progress import Progress

from commlab.data.base import Modality, MultimodalDataset, Task
from commlab.data.importers.common import Imported, SourceFormatError, get_key
from commlab.data.text import PretrainedTokenizer, WordTokenizer

GENRES = (
    "action", "adventure", "animation", "biography", "comedy", "crime", "documentary", "drama",
    "family", "fantasy", "film-noir", "history", "horror", "music", "musical", "mystery",
    "romance", "sci-fi", "short", "sport", "thriller", "war", "western",
)  # fmt: skip
SPLITS = {"train": "train", "dev": "val", "test": "test"}  # split.json key -> our split
_CHUNK = 256


def _data_dir(src: Path) -> Path:
    sub = src / "dataset"
    return sub if sub.is_dir() else src


def read_split_file(src: Path) -> dict[str, list[str]]:
    path = src / "split.json"
    if not path.is_file():
        raise SourceFormatError(path, "file not found (expected MM-IMDb's split.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SourceFormatError(path, f"not valid JSON ({err})") from None
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for key in SPLITS:
        ids = get_key(raw, key, path)
        if not isinstance(ids, list) or not all(isinstance(i, str | int) for i in ids):
            raise SourceFormatError(path, "expected a list of movie ids", key)
        if not ids:
            raise SourceFormatError(path, "split is empty", key)
        for i in map(str, ids):
            if i in seen:
                raise SourceFormatError(
                    path, f"movie id {i} is listed twice (also in {seen[i]})", key
                )
            seen[i] = key
        out[key] = [str(i) for i in ids]
    return out


def _choose_plot(plots: list[str], how: str) -> str:
    return max(plots, key=len) if how == "longest" else plots[0]  # max keeps the first on ties


def read_movie(
    folder: Path, movie: str, how: str, unknown: str, size: int
) -> tuple[str, np.ndarray, np.ndarray]:
    """(plot, multi-hot genres (23,), image (3, size, size) uint8) of one movie."""
    meta_path = folder / f"{movie}.json"
    if not meta_path.is_file():
        raise SourceFormatError(meta_path, "file not found (listed in split.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SourceFormatError(meta_path, f"not valid JSON ({err})") from None
    plots = get_key(meta, "plot", meta_path)
    if not isinstance(plots, list) or not plots or not all(isinstance(p, str) for p in plots):
        raise SourceFormatError(meta_path, "expected a non-empty list of strings", "plot")
    genres = get_key(meta, "genres", meta_path)
    if not isinstance(genres, list) or not all(isinstance(g, str) for g in genres):
        raise SourceFormatError(meta_path, "expected a list of strings", "genres")
    y = np.zeros(len(GENRES), dtype=np.int64)
    for g in genres:
        g = g.strip().lower()
        if g in GENRES:
            y[GENRES.index(g)] = 1
        elif unknown == "error":
            raise SourceFormatError(
                meta_path,
                f"unknown genre {g!r}; known: {', '.join(GENRES)} "
                "(unknown_genres='ignore' drops unknown genres, as the reference does)",
                "genres",
            )
    img_path = folder / f"{movie}.jpeg"
    try:
        with Image.open(img_path) as poster:
            fitted = ImageOps.fit(poster.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
            pixels = np.asarray(fitted, dtype=np.uint8).transpose(2, 0, 1)
    except FileNotFoundError:
        raise SourceFormatError(img_path, "file not found (poster of a listed movie)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise SourceFormatError(img_path, f"unreadable image ({err})") from None
    return _choose_plot(plots, how), y, pixels


def import_mmimdb(
    src: Path,
    bar: Progress,
    *,
    image_size: int = 224,
    plot: Literal["first", "longest"] = "first",
    max_length: int = 256,
    max_vocab: int = 30_000,
    min_freq: int = 2,
    unknown_genres: Literal["error", "ignore"] = "error",
    tokenizer_path: str | None = None,
    workers: int = 4,
) -> Imported:
    if plot not in ("first", "longest"):
        raise ValueError(f"plot must be 'first' or 'longest', got {plot!r}")
    if unknown_genres not in ("error", "ignore"):
        raise ValueError(f"unknown_genres must be 'error' or 'ignore', got {unknown_genres!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
    if not 1 <= max_length <= 512:
        raise ValueError(
            f"max_length must be in [1, 512] (the embedding encoder's limit), got {max_length}"
        )
    if not src.is_dir():
        raise SourceFormatError(src, "expected the MM-IMDb directory holding split.json")
    # Fail on a missing tokenizer before the long read.
    pretrained = PretrainedTokenizer(tokenizer_path, max_length) if tokenizer_path else None
    split_ids = read_split_file(src)
    movies = [m for ids in split_ids.values() for m in ids]
    n = len(movies)
    folder = _data_dir(src)
    images = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    labels = np.empty((n, len(GENRES)), dtype=np.int64)
    plots: list[str] = []
    task = bar.add_task(f"mmimdb: reading {n} movies", total=n)

    def read(movie: str) -> tuple[str, np.ndarray, np.ndarray]:
        return read_movie(folder, movie, plot, unknown_genres, image_size)

    # PIL decodes outside the GIL; chunks bound the work still queued when a file is bad.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for lo in range(0, n, _CHUNK):
            for i, (text, y, pixels) in enumerate(pool.map(read, movies[lo : lo + _CHUNK]), lo):
                plots.append(text)
                labels[i] = y
                images[i] = pixels
            bar.advance(task, min(_CHUNK, n - lo))
    n_train = len(split_ids["train"])
    tok = pretrained or WordTokenizer.fit(plots[:n_train], max_vocab, min_freq, max_length)
    ids, lengths = tok.encode_batch(plots)
    bounds = np.cumsum([0] + [len(v) for v in split_ids.values()])
    idx = torch.arange(n)
    ds = MultimodalDataset(
        modalities=[
            Modality("image", "image", torch.from_numpy(images), idx),
            Modality("text", "text", torch.from_numpy(ids), idx, torch.from_numpy(lengths)),
        ],
        labels={"genres": torch.from_numpy(labels)},
        tasks={"genres": Task("genres", "multilabel", len(GENRES))},
        splits={
            SPLITS[k]: torch.arange(int(lo), int(hi))
            for k, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True)
        },
    )
    params: dict[str, Any] = {
        "genres": list(GENRES),
        "image_size": image_size,
        "plot": plot,
        "unknown_genres": unknown_genres,
        "tokenizer": tok.to_params(),
    }
    return Imported(ds, params)
