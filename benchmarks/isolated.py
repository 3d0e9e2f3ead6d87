"""``--isolate``: each whole-model provider in a process of its own, timed in turns from this one.

In one process the providers share glibc's heap. glibc hands the eager model's freed activations
(45-88 MB each at batch 8) back to the kernel and maps them afresh on the next step, faulting every
page in again; how many of those pages come back depends on what the other providers' allocations left in
the heap, so the in-process rounds time the eager model with fewer page faults than it takes in a
training script of its own (Intel Xeon, batch 8 training step: 87-129 thousand faults a step beside
the other providers, 561 thousand alone). A worker process per provider runs each model as a
script of its own would, and this process still calls them in turns, round by round, so a slow spell
of the machine falls on every provider alike.

A worker is a ``multiprocessing`` spawn of :func:`_serve`; the parent sees a ``providers.Prepared``
whose ``fn`` runs one call in the worker and waits for it (the pipe's round trip is well under a
millisecond against seconds a step), whose ``memory`` asks the worker for its peak, and whose page
faults are the worker's (``/proc/<pid>/stat``, Linux only).
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Dict, Optional

from . import providers
from .cases import Case
from .memory import peak_allocated_mb


def supported() -> Optional[str]:
    """None where workers' page faults can be read (Linux), else why ``--isolate`` cannot run."""
    if not os.path.exists(f"/proc/{os.getpid()}/stat"):
        return "--isolate reads each worker's page faults from /proc/<pid>/stat, which this system lacks"
    return None


def _serve(case: Case, device: str, model_kwargs: Dict, threads: int, conn) -> None:
    """The worker: prepare ``case``, call it once, then answer "call", "memory" and "stop"."""
    import torch

    torch.set_num_threads(threads)
    try:
        prepared = providers.prepare(case, device, model_kwargs)
        prepared.fn()
    except Exception as error:  # noqa: BLE001 - reported to the parent, which writes an error row
        conn.send(("error", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready", prepared.ran))
    while True:
        command = conn.recv()
        try:
            if command == "call":
                prepared.fn()
                conn.send(("ok", None))
            elif command == "memory":
                conn.send(("ok", peak_allocated_mb(prepared.fn, device)))
            else:
                return
        except Exception as error:  # noqa: BLE001
            conn.send(("error", f"{type(error).__name__}: {error}"))
            return


class Worker:
    """One case in its own process; ``prepared`` is what the timing code calls."""

    def __init__(self, case: Case, device: str, model_kwargs: Dict, threads: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(case, device, model_kwargs, threads, child),
                                        daemon=True)
        self._process.start()
        child.close()
        try:
            ran = self._ask(None)
        except BaseException:  # the worker could not prepare its case: nothing is left running
            self.close()
            raise
        self.prepared = providers.Prepared(self.call, ran=ran)
        self.prepared.memory = lambda: self._ask("memory")
        self.prepared.faults = self.minor_faults

    def _ask(self, command: Optional[str]):
        if command is not None:
            self._conn.send(command)
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the worker process ended (exit code {self._process.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"in the worker process: {value}")
        return value

    def call(self) -> None:
        self._ask("call")

    def minor_faults(self) -> int:
        """The worker's minor page faults so far (field 10 of /proc/<pid>/stat)."""
        with open(f"/proc/{self._process.pid}/stat") as stat:
            text = stat.read()
        return int(text[text.rindex(")") + 2:].split()[7])

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send("stop")
            except OSError:
                pass
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn.close()
