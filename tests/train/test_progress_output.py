"""Progress lines reach the terminal once, also inside a Ray Train V2 worker, whose `print`
is replaced by one that writes to stdout and to Train's logger; Ray Train's per-report lines
stay off the console."""

from __future__ import annotations

import builtins
import contextlib
import logging
import sys
from collections.abc import Iterator

import pytest
from ray._private.log import PlainRayHandler
from ray.train.v2._internal.logging.patch_print import redirected_print

from commlab.train.loop import say
from commlab.train.worker import quiet_report_lines


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


class _Kept(logging.Handler):
    """Stands for Ray's session-file handlers (plain `logging.Handler`s)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_report_lines_leave_the_console_not_the_session_logs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # the worker's `ray.train` logger as Ray Train V2 configures it: Ray's console handler
    # (stderr at emit time) and file handlers; records come from its storage / context modules
    train = logging.getLogger("ray.train")
    console, files = PlainRayHandler(), _Kept()
    saved = (train.handlers[:], train.level, train.propagate)
    train.handlers[:] = [console, files]
    train.setLevel(logging.DEBUG)
    train.propagate = False
    try:
        quiet_report_lines()
        quiet_report_lines()  # idempotent: one filter
        assert len(console.filters) == 1 and not files.filters
        storage = logging.getLogger("ray.train.v2._internal.execution.storage")
        context = logging.getLogger("ray.train.v2._internal.execution.context")
        storage.info("Checkpoint successfully created at: Checkpoint(path=/tmp/x)")
        context.info("Reporting training result 1: TrainingReport(metrics={...})")
        context.info("Started training worker group of size 2")
        context.warning("Reporting training result took 40 s")  # warnings always pass
    finally:
        train.handlers[:], train.level, train.propagate = saved
    err = capsys.readouterr().err
    assert "Checkpoint successfully created" not in err
    assert "Reporting training result 1" not in err
    assert "Started training worker group of size 2" in err
    assert "Reporting training result took 40 s" in err
    assert files.messages[:2] == [
        "Checkpoint successfully created at: Checkpoint(path=/tmp/x)",
        "Reporting training result 1: TrainingReport(metrics={...})",
    ]
