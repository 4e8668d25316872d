"""What every dataset writer promises: written through a private temp dir (mkdtemp: 0700), the
finished dataset is as readable as anything else the user writes (the umask decides), e.g. by a
Ray node's user."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path


def assert_written_with_ordinary_permissions(write: Callable[[], Path]) -> None:
    old = os.umask(0o022)
    try:
        out = write()
    finally:
        os.umask(old)
    dirs = [out, *(p for p in out.rglob("*") if p.is_dir())]
    assert all(stat.S_IMODE(d.stat().st_mode) == 0o755 for d in dirs)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files)
