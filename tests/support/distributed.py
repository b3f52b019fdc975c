"""Spawning a small gloo process group for the distributed tests."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import torch

#: FSDP2 on CPU tensors over gloo, as these tests run it: the tests fail on torch 2.5 and 2.6
#: (2.6: 'Stream' object has no attribute 'record_event'), 2.7 and 2.8 sum the ranks' gradients
#: where later releases average them; 2.9.1 and later train as one process (docs/ops.md,
#: "Torch and Python versions").
FSDP2_ON_CPU = torch.__version__ >= "2.9"
fsdp2_on_cpu = pytest.mark.skipif(not FSDP2_ON_CPU, reason="FSDP2 on CPU (gloo) needs torch >= 2.9")


def spawn(body: Callable[[int, int], object], world: int = 2, timeout: float = 300.0) -> dict:
    """Runs ``body(rank, world)`` (a module-level function) in ``world`` spawned processes
    joined in a gloo group. Returns {rank: what body returned, or the repr of what it raised}:
    the test fails on it."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_gloo_process, args=(body, r, world, port, queue)) for r in range(world)
    ]
    for proc in procs:
        proc.start()
    try:
        results = dict(queue.get(timeout=timeout) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return results


def _gloo_process(body: Callable, rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        queue.put((rank, body(rank, world)))
    except Exception as err:
        queue.put((rank, repr(err)))
    finally:
        dist.destroy_process_group()
