"""One thread for a serving process's multi-threaded torch work.

PyTorch's OpenMP runtime (libgomp) gives every thread that starts a parallel region its own
team of worker threads, and once a process's teams hold more threads than it has CPUs it
throttles their waiting: workers sleep between parallel regions instead of spinning, and a
decode step runs hundreds of regions, each waiting for futex wake-ups. Measured (Xeon, 2
cores, embedded int4 model, one decode step): 3.9 ms on the main thread; 17.6 ms on a second
thread after the main thread had run a two-thread forward (loading the model); 3.9 ms on
that second thread when the main thread never ran one. A batching server runs every forward
on one thread (batching.py), so its load, its drafters' set-up and its measurements must run
there too, and every other thread keeps a single intra-op thread.

`start()` makes the calling process route work through `run()` to that one thread (the
server and the batching scripts call it before any torch work); without it `run()` calls
in place (the command line's generate, tests).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread: threading.Thread | None = None


def start(threads: int | None = None) -> None:
    """Route `run()` to one compute thread with `threads` intra-op threads (default: this
    thread's count), and leave the calling thread one. Idempotent."""
    global _executor
    with _lock:
        if _executor is not None:
            return
        n = threads or torch.get_num_threads()
        _executor = ThreadPoolExecutor(1, "specdecode-compute", initializer=_enter, initargs=(n,))
    _executor.submit(lambda: None).result()  # the thread exists (and is known) from here on
    torch.set_num_threads(1)


def _enter(threads: int) -> None:
    global _thread
    _thread = threading.current_thread()
    set_thread_count(threads)


def set_thread_count(threads: int) -> None:
    """This thread's intra-op thread count (OpenMP keeps one per thread). ATen initialises a
    thread's count lazily, on its first parallel op, from the count last set in the whole
    process: without the read first, a later `torch.set_num_threads(1)` on another thread (the
    caller of `start`, a seated request) would become this thread's count too."""
    torch.get_num_threads()  # (ATen's per-thread lazy init, now)
    torch.set_num_threads(threads)
    from specdecode import kernels

    if kernels.library_error() is None:
        # Our library keeps its own copy of that lazy init (an inline function's thread_local):
        # run it now too, or our first kernel on this thread resets the count to the process's
        # last one (1, set by `start`'s caller): the compute thread ran on one core (Zen 3,
        # embedded int4 step 7.1 -> 11.2 ms).
        torch.ops.specdecode.set_thread_count(threads)


def started() -> bool:
    return _executor is not None


def run(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """fn(*args, **kwargs) on the compute thread (in the caller's grad and inference modes),
    or here when none was started or this is that thread."""
    if _executor is None or threading.current_thread() is _thread:
        return fn(*args, **kwargs)
    return run_on(_executor, fn, *args, **kwargs)


def run_on(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """fn(*args, **kwargs) on `executor`'s thread, in the caller's grad and inference modes; waits."""
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def call() -> T:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(*args, **kwargs)

    return executor.submit(call).result()
