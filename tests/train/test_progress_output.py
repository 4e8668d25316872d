"""Progress lines reach the terminal once, also inside a Ray Train V2 worker, whose `print`
is replaced by one that writes to stdout and to Train's logger."""

from __future__ import annotations

import builtins
import contextlib
import logging
import sys
from collections.abc import Iterator

import pytest
from ray.train.v2._internal.logging.patch_print import redirected_print

from commlab.train.loop import say


@contextlib.contextmanager
def ray_train_print(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The worker's setup: print patched, the root logger echoing to the (forwarded) stdout.
    Entered inside the test, so the handler writes to capsys's stdout."""
    monkeypatch.setattr(builtins, "print", redirected_print)
    handler = logging.StreamHandler(sys.stdout)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        monkeypatch.undo()


def test_patched_print_repeats_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the worker's own print shows a line twice: what `say` avoids
    with ray_train_print(monkeypatch):
        print("epoch   1/2  loss 4.8515", flush=True)
    assert capsys.readouterr().out.count("epoch   1/2  loss 4.8515") == 2


def test_say_writes_each_line_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with ray_train_print(monkeypatch):
        say("epoch   1/2  loss 4.8515")
        say("epoch   2/2  loss 4.1800")
    out = capsys.readouterr().out
    assert out.splitlines() == ["epoch   1/2  loss 4.8515", "epoch   2/2  loss 4.1800"]
