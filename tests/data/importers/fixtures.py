"""Small sources in the exact published formats (notes §6.5), written by the tests.

Shapes, key names, dtypes and layouts follow the real files; the sizes are small. Labels depend
on the inputs, so a probe has something to find.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from commlab.config import load_config
from commlab.train.loop import PretrainRun

ROOT = Path(__file__).resolve().parents[3]
AFFECT_DIMS = {"mosi": (20, 5), "mosei": (35, 74), "humor": (371, 81), "sarcasm": (371, 81)}


# ---------------------------------------------------------------- affect
def affect_split(rng: np.random.Generator, n: int, p_v: int, p_a: int, t: int = 50) -> dict:
    """One split: text left-padded with zero rows, vision/audio non-zero from the same row."""
    start = rng.integers(1, t - 3, size=n)
    score = np.round(rng.uniform(-3, 3, size=n), 1)
    score[score == 0] = 0.5
    steps = np.arange(t)[None, :, None]
    on = steps >= start[:, None, None]
    sign = np.sign(score)[:, None, None]
    vision = (rng.normal(size=(n, t, p_v)) + sign) * on
    audio = rng.normal(size=(n, t, p_a)) * on
    text = (rng.normal(size=(n, t, 300)) + 0.5 * sign) * on
    audio[0, -1, 0] = -np.inf  # COVAREP-style -inf, zeroed by the loader
    return {
        "vision": vision.astype(np.float32),
        "audio": audio.astype(np.float32),
        "text": text.astype(np.float32),
        "labels": score.reshape(n, 1, 1).astype(np.float32),
        "id": np.array([f"clip{i}" for i in range(n)]),
    }


def write_affect_pickle(
    path: Path, dataset: str = "mosi", sizes: tuple[int, int, int] = (24, 8, 8), seed: int = 0
) -> Path:
    p_v, p_a = AFFECT_DIMS[dataset]
    rng = np.random.default_rng(seed)
    data = {
        key: affect_split(rng, n, p_v, p_a)
        for key, n in zip(("train", "valid", "test"), sizes, strict=True)
    }
    empty = data["train"]  # one sample with all-zero text: dropped by the loader
    for k in ("vision", "audio", "text"):
        empty[k][1] = 0.0
    return write_pickle(path, data)


def write_pickle(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(data, f)
    return path


# ---------------------------------------------------------------- MIMIC
def mimic_data(n: int = 60, seed: int = 0, nan: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_icd9 = rng.integers(0, 2, size=(n, 20))
    ep_tdata = rng.normal(size=(n, 24, 12)) + y_icd9[:, 7, None, None]
    adm_features = rng.normal(loc=50, scale=10, size=(n, 5)) + 5 * y_icd9[:, 7, None]
    adm_labels = (rng.uniform(size=(n, 6)) < 0.15).astype(np.float64)
    if nan:
        ep_tdata[3, 4, 5] = np.nan
        adm_features[2, 1] = np.inf
    return {
        "ep_tdata": ep_tdata,
        "adm_features_all": adm_features,
        "adm_labels_all": adm_labels,
        "y_icd9": y_icd9,
    }


def write_mimic_pickle(path: Path, n: int = 60, seed: int = 0, nan: bool = True) -> Path:
    return write_pickle(path, mimic_data(n, seed, nan))


# ---------------------------------------------------------------- Vision&Touch
def vt_episode(rng: np.random.Generator, steps: int = 50, size: int = 128) -> dict[str, np.ndarray]:
    contact = (rng.uniform(size=(steps, 50)) < 0.02).astype(np.float64)
    touching = contact.sum(1) > 0
    image = rng.integers(0, 256, size=(steps, size, size, 3), dtype=np.uint8)
    image[touching, : size // 2] //= 2  # contact darkens the top half
    force = rng.normal(size=(steps, 50, 6))
    force[touching] += 2.0
    return {
        "image": image,
        "depth_data": rng.uniform(size=(steps, size, size, 1)).astype(np.float32),
        "proprio": rng.normal(size=(steps, 8)),
        "ee_forces_continuous": force,
        "optical_flow": rng.normal(size=(steps, size, size, 2)).astype(np.float32),
        "action": rng.normal(size=(steps, 4)),
        "contact": contact,
    }


def write_vt_dir(
    root: Path, files: int = 5, steps: int = 50, size: int = 128, seed: int = 0
) -> Path:
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(files):
        with h5py.File(root / f"triangle_{i:04d}_1000.h5", "w") as f:
            for key, value in vt_episode(rng, steps, size).items():
                f.create_dataset(key, data=value)
    return root


# ---------------------------------------------------------------- MM-IMDb
MMIMDB_GENRES = ["Drama", "Comedy", "Sci-Fi", "Film-Noir", "Action", "Romance"]
WORDS = ["the", "a", "hero", "love", "war", "space", "detective", "city", "night", "family"]


def write_mmimdb(
    root: Path, sizes: tuple[int, int, int] = (16, 6, 6), seed: int = 0, poster=(40, 56)
) -> Path:
    """`root/split.json` and `root/dataset/{id}.json|.jpeg` with IMDb-style genre spellings."""
    rng = np.random.default_rng(seed)
    folder = root / "dataset"
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{1000000 + i:07d}" for i in range(sum(sizes))]
    bounds = np.cumsum([0, *sizes])
    split = {
        k: ids[lo:hi]
        for k, lo, hi in zip(("train", "dev", "test"), bounds[:-1], bounds[1:], strict=True)
    }
    (root / "split.json").write_text(json.dumps(split))
    for i, movie in enumerate(ids):
        genres = [MMIMDB_GENRES[i % 3], MMIMDB_GENRES[3 + (i % 2)]]
        plots = [
            " ".join(rng.choice(WORDS, size=int(rng.integers(5, 30)))).capitalize() + ".",
            f"{genres[0]} story number {i}, with the word only{i}.",
        ]
        meta = {"title": f"Movie {i}", "year": 1990 + i % 30, "genres": genres, "plot": plots}
        (folder / f"{movie}.json").write_text(json.dumps(meta))
        colour = np.array([200 * (i % 3 == 0), 200 * (i % 3 == 1), 200 * (i % 3 == 2)])
        pixels = rng.integers(0, 55, size=(poster[1], poster[0], 3)) + colour
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{movie}.jpeg", quality=90)
    return root


# ---------------------------------------------------------------- pretraining
def pretrain_one_epoch(dataset_dir: Path, config: str, overrides: list[str]) -> dict[str, float]:
    """One CPU epoch of the dataset's shipped config on `dataset_dir`, shrunk by `overrides`."""
    cfg = load_config(
        ROOT / "configs" / config / "comm.yaml",
        [
            f"data.path={dataset_dir}",
            "data.batch_size=8",
            "train.epochs=1",
            "train.probe_every=1",
            "train.device=cpu",
            "train.max_steps_per_epoch=2",
            "model.head.hidden_dim=32",
            "model.head.out_dim=16",
            *overrides,
        ],
    )
    assert cfg.data.name == "parquet"  # loaded by the generic builder, as a user's run would
    return PretrainRun(cfg).fit()
