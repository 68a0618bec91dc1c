"""Contenders of a benchmark each in a process of its own, run in turn.

Some speed settings belong to the whole process (the C allocator's, :func:`distill.speed.keep_freed_host_memory`;
compiled code; thread pools), so two contenders timed in one process share them: the eager step would run on the
allocator the default options set, and a process that compiled the student has a different heap from one that
did not. :class:`InTurn` starts one process per contender (``spawn``: each a fresh interpreter) and makes them
work one at a time: the parent asks one contender for a call and waits for its answer before asking the next, so
their work never overlaps and the machine's slow drifts reach both alike (with :func:`distill.bench.timing.
interleaved` deciding the order). Each contender times its own calls, so the figures hold no messaging cost.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = ["Contender", "ContenderError", "InTurn"]

_START_TIMEOUT_S = 1800.0  # building a contender may compile a student (minutes on a small CPU)


class Contender(Protocol):
    """What a builder returns in the child process: ``info`` (sent once, after the build) and the methods the
    parent calls by name; every answer must pickle."""

    info: dict[str, Any]


class ContenderError(RuntimeError):
    """A contender's process failed; the message holds its traceback."""


def _serve(conn, build: Callable[..., Contender], args: tuple) -> None:
    try:
        contender = build(*args)
        conn.send(("ok", {**contender.info, "pid": os.getpid()}))
        while (command := conn.recv()) != "stop":
            conn.send(("ok", getattr(contender, command)()))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent, whose error names the contender
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class InTurn:
    """``with InTurn({name: (build, args)}) as turn:`` one process per contender, built by ``build(*args)``;
    ``turn.info[name]`` is its ``info`` plus its ``pid``, and ``turn.call(name, method)`` runs one method there
    and returns its answer. The processes end when the block does."""

    def __init__(self, contenders: Mapping[str, tuple[Callable[..., Contender], tuple]]) -> None:
        self._contenders = dict(contenders)
        self._conns: dict[str, Any] = {}
        self._procs: dict[str, Any] = {}
        self.info: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> InTurn:
        ctx = mp.get_context("spawn")
        try:
            for name, (build, args) in self._contenders.items():
                parent, child = ctx.Pipe()
                # not daemonic: a contender may start processes of its own (inductor's compile workers); a child
                # whose parent is gone ends at its next receive (end of file)
                proc = ctx.Process(target=_serve, args=(child, build, args), name=f"bench-{name}")
                proc.start()
                child.close()
                self._conns[name], self._procs[name] = parent, proc
            for name in self._contenders:  # built side by side; nothing is timed yet
                self.info[name] = self._answer(name, _START_TIMEOUT_S)
        except BaseException:
            self._end()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._end()

    def call(self, name: str, method: str) -> Any:
        self._conns[name].send(method)
        return self._answer(name, None)

    def _answer(self, name: str, timeout: float | None) -> Any:
        conn = self._conns[name]
        if timeout is not None and not conn.poll(timeout):
            raise ContenderError(f"contender {name!r}: no answer within {timeout:.0f} s")
        try:
            status, value = conn.recv()
        except EOFError:
            self._procs[name].join(5)
            raise ContenderError(f"contender {name!r}: its process ended without an answer (exit code "
                                 f"{self._procs[name].exitcode})") from None  # fmt: skip
        if status == "error":
            raise ContenderError(f"contender {name!r} failed in its process:\n{value}")
        return value

    def _end(self) -> None:
        for conn in self._conns.values():
            try:
                conn.send("stop")
            except (OSError, ValueError):  # already gone
                pass
        for proc in self._procs.values():
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for conn in self._conns.values():
            conn.close()
