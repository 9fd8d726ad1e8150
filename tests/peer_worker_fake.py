"""A stand-in for specdecode.bench.llamacpp_worker, served in the peer's child process by the tests.

Each mode misbehaves in its own way: `llamacpp` segfaults on its third request (warm-up, first
prompt, then the second prompt), `llamacpp-lookup` aborts while loading, `sleep` never answers;
the others answer at once. Every load writes 64 MiB of fresh pages, as a loaded model would.
"""

from __future__ import annotations

import mmap
import os
import signal
import time
from typing import Any

_held: list[mmap.mmap] = []


def unavailable_reason() -> str | None:
    return None


def load(options: dict[str, Any]) -> "FakeServer":
    if options["mode"] == "llamacpp-lookup":
        os.abort()
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\1" * (64 * 2**20))
    _held.append(block)
    return FakeServer(options["mode"])


class FakeServer:
    def __init__(self, mode: str) -> None:
        self.mode, self.requests = mode, 0

    def run(self, request: dict[str, Any], k: int | None) -> dict[str, Any]:
        self.requests += 1
        if self.mode == "llamacpp" and self.requests == 3:
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.mode == "sleep":
            time.sleep(60)
        tokens = [request["prompt_ids"][-1]] * request["max_new_tokens"]
        return dict(token_ids=tokens, wall_seconds=0.01, prefill_seconds=0.002, target_forwards=len(tokens))
