"""A peer served by a child process, so that a crash in its native code cannot take the bench down.

The parent starts the child with multiprocessing's spawn context and talks to it over a pipe:

    child -> parent  {"ready": {...load figures...}}  or  {"error": "one line"}   (once, after loading)
    parent -> child  {"request": {...asdict(Request)...}, "k": k}                 (per run)
    child -> parent  {"outcome": {...Outcome fields...}}  or  {"error": "one line"}
    parent -> child  None                                                        (stop)

The child imports the worker module named by the parent (`worker`, a module path) and calls its
`load(options)`, which returns an object with `run(request: dict, k) -> dict`. Production passes
specdecode.bench.llamacpp_worker; tests pass a fake that crashes on purpose. The worker times the
generation itself, so the pipe's cost is not charged to the peer.

When the child dies (a signal: SIGSEGV, SIGABRT, the OOM killer's SIGKILL) or does not answer in
time, `PeerFailed` says how; the process is gone and every later call raises the same failure.
"""

from __future__ import annotations

import importlib
import multiprocessing
import signal
import time
from typing import Any

from specdecode.memory import current_rss_bytes

LOAD_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 600.0


class PeerFailed(Exception):
    """The peer's child process crashed, timed out or reported an error; `what` says which."""

    def __init__(self, what: str, hint: str = "") -> None:
        super().__init__(what)
        self.what, self.hint = what, hint

    def reason(self, family: str, where: str) -> str:
        """e.g. 'llama.cpp crashed: SIGSEGV (exit -11) while decoding prompt 3; build ...'."""
        return f"{family} {self.what} {where}" + (f"; {self.hint}" if self.hint else "")


def exit_description(exitcode: int | None) -> str:
    """'SIGSEGV (exit -11)' for a signal, 'exit 3' for a plain exit status."""
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"{name} (exit {exitcode})"
    return f"exit {exitcode}"


def child_main(worker: str, options: dict[str, Any], conn: Any) -> None:
    """The child's entry point: load through the worker module, then answer requests until None."""
    try:
        rss_before, start = current_rss_bytes(), time.perf_counter()
        server = importlib.import_module(worker).load(options)
        rss_after = current_rss_bytes()
        added = None if rss_before is None or rss_after is None else rss_after - rss_before
        conn.send({"ready": {"load_seconds": round(time.perf_counter() - start, 3), "rss_bytes": rss_after,
                             "rss_added_bytes": added}})
    except Exception as exc:  # a Python error while loading: reported, not a crash
        conn.send({"error": f"failed to load: {type(exc).__name__}: {exc}"})
        return
    while True:
        message = conn.recv()
        if message is None:
            return
        try:
            conn.send({"outcome": server.run(message["request"], message["k"])})
        except Exception as exc:
            conn.send({"error": f"raised {type(exc).__name__}: {exc}"})


class PeerProcess:
    """One child process serving one peer: started (and loaded) by `start`, asked by `run`."""

    def __init__(self, worker: str, options: dict[str, Any], crash_hint: str = "",
                 load_timeout: float = LOAD_TIMEOUT_S, request_timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.worker, self.options, self.crash_hint = worker, options, crash_hint
        self.load_timeout, self.request_timeout = load_timeout, request_timeout
        self.load_figures: dict[str, Any] = {}
        self.failure: PeerFailed | None = None
        self._process: Any = None
        self._conn: Any = None

    def start(self) -> dict[str, Any]:
        """Spawn the child and wait until it has loaded; returns its load figures (seconds, RSS)."""
        context = multiprocessing.get_context("spawn")
        self._conn, child_end = context.Pipe()
        self._process = context.Process(target=child_main, args=(self.worker, self.options, child_end), daemon=True)
        self._process.start()
        child_end.close()  # the parent's copy: once the child dies, recv() sees EOF instead of waiting
        self.load_figures = self._receive("ready", self.load_timeout)
        return self.load_figures

    def run(self, request: dict[str, Any], k: int | None) -> dict[str, Any]:
        """The outcome dict of one request; raises PeerFailed if the child is (or goes) down."""
        if self.failure is not None:
            raise self.failure
        try:
            self._conn.send({"request": request, "k": k})
        except (BrokenPipeError, OSError):
            pass  # the child is gone: _receive reports how it died
        return self._receive("outcome", self.request_timeout)

    def _receive(self, key: str, timeout: float) -> dict[str, Any]:
        message: Any = None
        try:
            if self._conn.poll(timeout):
                message = self._conn.recv()
            else:
                self._fail(f"timed out after {timeout:.0f} s", kill=True)
        except (EOFError, OSError):
            self._process.join(5.0)
            self._fail(f"crashed: {exit_description(self._process.exitcode)}", hint=self.crash_hint)
        if "error" in message:
            self._fail(message["error"], kill=key == "ready")
        return message[key]

    def _fail(self, what: str, kill: bool = False, hint: str = "") -> None:
        if kill:
            self.close()
        self.failure = PeerFailed(what, hint)
        raise self.failure

    def close(self) -> None:
        """Ask the child to stop; kill it if it does not within a few seconds."""
        if self._process is None:
            return
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._process.join(5.0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5.0)
        self._conn.close()
        self._process = None
