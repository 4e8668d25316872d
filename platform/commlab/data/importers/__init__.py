"""Importers: published benchmark files -> the commlab Parquet dataset format.

`import_dataset(name, src, out, **options)` reads and checks the whole source, then writes the
dataset atomically (a malformed source raises `SourceFormatError` naming the file and key, and
leaves no output behind). The same source and options give byte-identical files.

Pickle sources (affect, MIMIC) are read with a restricted unpickler that admits only numpy arrays
and builtin containers (a pickle naming anything else, e.g. a `__reduce__` that runs a command, is
refused before it runs). Nothing is ever downloaded.
"""

from __future__ import annotations

import inspect
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from commlab.config import parse_value
from commlab.data.importers.affect import import_affect
from commlab.data.importers.common import Imported, SourceFormatError, new_progress
from commlab.data.importers.mimic import import_mimic
from commlab.data.importers.mmimdb import import_mmimdb
from commlab.data.importers.visionandtouch import import_visionandtouch
from commlab.data.parquet import validate_dataset, write_dataset
from commlab.registry import Registry

# importer(src: Path, bar: rich Progress, **options) -> Imported
IMPORTERS: Registry[Callable[..., Imported]] = Registry("importer")


def _affect(dataset: str) -> Callable[..., Imported]:
    def importer(src: Path, bar: Any, **options: Any) -> Imported:
        return import_affect(src, bar, dataset=dataset, **options)

    importer.__signature__ = inspect.signature(import_affect).replace(  # type: ignore[attr-defined]
        parameters=[
            p for p in inspect.signature(import_affect).parameters.values() if p.name != "dataset"
        ]
    )
    return importer


for _name in ("mosi", "mosei", "humor", "sarcasm"):
    IMPORTERS.register(_name)(_affect(_name))
IMPORTERS.register("mimic")(import_mimic)
IMPORTERS.register("visionandtouch")(import_visionandtouch)
IMPORTERS.register("mmimdb")(import_mmimdb)
_NO_EFFECT = {"workers"}  # options that cannot change the output are not stored


def importer_options(name: str) -> dict[str, Any]:
    """The options an importer accepts, with their defaults."""
    params = list(inspect.signature(IMPORTERS.get(name)).parameters.values())[2:]
    return {p.name: p.default for p in params}


def parse_options(items: list[str]) -> dict[str, Any]:
    """`["plot=longest", "image_size=128"]` -> options (values with YAML scalar semantics)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"importer option '{item}' is not of the form key=value")
        out[key.strip()] = parse_value(value)
    return out


def import_dataset(
    name: str,
    src: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    validate: bool = True,
    **options: Any,
) -> Path:
    """Convert the source `src` of dataset `name` into a dataset directory `out`; returns `out`.

    `options` are the importer's (see `importer_options(name)`); an unknown one is an error that
    lists the valid ones. With `validate`, the written dataset is checked with `validate_dataset`
    and removed if it has a problem (which would be an importer bug).
    """
    importer = IMPORTERS.get(name)
    valid = importer_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"importer '{name}' has no option(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
        )
    src, out = Path(src), Path(out)
    if not src.exists():
        raise SourceFormatError(src, "not found")
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"dataset directory {out} already exists (overwrite=True / --overwrite replaces it)"
        )
    with new_progress(progress) as bar:
        result = importer(src, bar, **options)
        chosen = {k: v for k, v in {**valid, **options}.items() if k not in _NO_EFFECT}
        params = {
            "importer": name,
            "source": src.name,
            "options": chosen,
            **result.params,
        }
        write = bar.add_task(f"{name}: writing {out.name}", total=None)
        path = write_dataset(result.dataset, out, params, overwrite=overwrite)
        bar.update(write, total=1, completed=1)
    if validate:
        problems = validate_dataset(path)
        if problems:
            shutil.rmtree(path, ignore_errors=True)
            raise SourceFormatError(src, "imported dataset is invalid: " + "; ".join(problems))
    return path


__all__ = [
    "IMPORTERS",
    "Imported",
    "SourceFormatError",
    "import_dataset",
    "importer_options",
    "parse_options",
]
