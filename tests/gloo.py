"""Run a check on N local gloo processes (loopback only), as the distributed tests do.

`run_on_workers(fn, out_dir)` spawns the workers; each brings up a process group, calls
`fn(rank)` and saves what it returns to `rank<r>.pt`. A worker's error is written to
`rank<r>.err` and fails the test with that worker's traceback; a hung worker is killed.
"""

from __future__ import annotations

import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int, fn: Callable[[int], Any], world: int, port: int, out_dir: str, timeout_s: float
) -> None:
    try:
        torch.set_num_threads(1)
        tdist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        torch.save(fn(rank), Path(out_dir) / f"rank{rank}.pt")
    except Exception:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def run_on_workers(
    fn: Callable[[int], Any], out_dir: Path, world: int = 2, timeout_s: float = 60
) -> list[Any]:
    """`fn(rank)` (a module-level function) on `world` spawned gloo processes; what each
    returned, in rank order."""
    ctx = mp.get_context("spawn")
    port = free_port()
    args = (fn, world, port, str(out_dir), timeout_s)
    procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(world)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(2 * timeout_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    errors = "\n".join(f.read_text() for f in sorted(Path(out_dir).glob("*.err")))
    assert not errors, errors
    assert [p.exitcode for p in procs] == [0] * world, "a worker hung or died"
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]
