"""Shared pieces of the source importers: the error type, array checks and pickle loading.

Every check names the file and the key it was reading, so a malformed source gives one message a
user can act on. Importers read and check the whole source before anything is written.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from commlab.data.base import MultimodalDataset


class SourceFormatError(ValueError):
    """A source file that does not match its published format (names the file and the key)."""

    def __init__(self, file: str | Path, problem: str, key: str | None = None) -> None:
        self.file = str(file)
        self.key = key
        where = f"{file} [{key}]" if key else f"{file}"
        super().__init__(f"{where}: {problem}")


@dataclass
class Imported:
    """What an importer returns: the dataset and the JSON-able params stored in its schema."""

    dataset: MultimodalDataset
    params: dict[str, Any] = field(default_factory=dict)


# What the published MultiBench pickles hold: dicts / lists of numpy arrays and scalars.
# Everything else a pickle can name (os.system, subprocess, builtins.eval, ...) is refused.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.ma.core", "_mareconstruct"),
    ("numpy.ma.core", "MaskedArray"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("builtins", "range"),
    ("__builtin__", "set"),  # Python 2 names of the same builtins
    ("__builtin__", "frozenset"),
}


class UnsafePickleError(SourceFormatError):
    """The pickle names something other than numpy arrays and builtin containers."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only the numpy and builtin types the published dataset pickles hold."""

    def __init__(self, file: Any, path: Path, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise UnsafePickleError(
                self.path,
                f"refused to load: the pickle references {module}.{name}, which a dataset of "
                "numpy arrays never needs (it could run code). Only numpy arrays, numbers, "
                "strings, lists and dicts are admitted; convert the file with the code that "
                "wrote it, or check where it came from",
            )
        if module == "__builtin__":
            module = "builtins"
        return super().find_class(module, name)


def load_pickle(path: Path) -> Any:
    """Unpickle `path` with a restricted unpickler: numpy arrays and builtin containers only.

    A pickle can name any importable callable and have it run on load; the published files
    need none, so anything else is refused with `UnsafePickleError` before it is called.
    """
    if not path.is_file():
        raise SourceFormatError(path, "file not found")
    for encoding in ("ASCII", "latin1"):  # latin1: pickles written by Python 2 with numpy arrays
        try:
            with path.open("rb") as f:
                return _RestrictedUnpickler(f, path, encoding).load()
        except UnicodeDecodeError:
            continue
        except SourceFormatError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as err:
            raise SourceFormatError(
                path, f"not a readable pickle (truncated or corrupt?): {type(err).__name__}: {err}"
            ) from None
    raise SourceFormatError(path, "pickle holds strings in an unknown encoding")


def get_key(mapping: Any, key: str, file: Path, where: str = "") -> Any:
    """`mapping[key]`, or an error naming the file, the key and the keys that are there."""
    name = f"{where}.{key}" if where else key
    if not isinstance(mapping, Mapping):
        raise SourceFormatError(
            file, f"expected a dict, found {type(mapping).__name__}", where or None
        )
    if key not in mapping:
        present = ", ".join(sorted(map(str, mapping))) or "none"
        raise SourceFormatError(file, f"missing key (keys present: {present})", name)
    return mapping[key]


def as_array(
    value: Any,
    file: Path,
    key: str,
    *,
    ndim: int | None = None,
    rows: int | None = None,
    tail: Sequence[int | None] | None = None,
    numeric: bool = True,
) -> np.ndarray:
    """`value` as a numpy array with the expected rank, row count and trailing dims (None = any)."""
    try:
        a = np.asarray(value)
    except Exception as err:  # ragged lists and the like
        raise SourceFormatError(file, f"not an array ({err})", key) from None
    if numeric and a.dtype.kind not in "biuf":
        raise SourceFormatError(file, f"expected numbers, found dtype {a.dtype}", key)
    if ndim is not None and a.ndim != ndim:
        raise SourceFormatError(
            file, f"expected {ndim} dimensions, found shape {tuple(a.shape)}", key
        )
    if rows is not None and a.shape[0] != rows:
        raise SourceFormatError(
            file, f"expected {rows} rows (one per sample), found {a.shape[0]}", key
        )
    if tail is not None:
        got = a.shape[a.ndim - len(tail) :]
        if len(got) != len(tail) or any(
            t is not None and g != t for g, t in zip(got, tail, strict=True)
        ):
            want = tuple("*" if t is None else t for t in tail)
            raise SourceFormatError(
                file, f"expected trailing shape {want}, found shape {tuple(a.shape)}", key
            )
    return a


def non_finite(a: np.ndarray) -> np.ndarray:
    """Boolean mask of NaN / inf entries (all False for integer arrays)."""
    return ~np.isfinite(a) if a.dtype.kind == "f" else np.zeros(a.shape, dtype=bool)


def require_finite(a: np.ndarray, file: Path, key: str, hint: str = "") -> None:
    bad = non_finite(a)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise SourceFormatError(
            file, f"{int(bad.sum())} NaN/inf values (first at index {first}){hint}", key
        )


def parse_names(value: str | Sequence[str], valid: Sequence[str], what: str) -> list[str]:
    """A modality list given as 'a,b' or ['a', 'b'], checked against `valid`."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if not names or any(n not in valid for n in names) or len(set(names)) != len(names):
        raise ValueError(
            f"{what} must be distinct names from {', '.join(valid)}; got {', '.join(names) or '-'}"
        )
    return names


def new_progress(enabled: bool) -> Progress:
    return Progress(disable=not enabled, transient=False)
