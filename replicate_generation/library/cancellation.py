"""The a* forms: a synchronous call in a thread, which cancels its jobs when its task is cancelled
(as Ctrl-C does in a synchronous call)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")
# Set by the a* functions in their worker thread's context: the awaiting task was cancelled.
CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "replicate_generation_cancel", default=None)


class CallCancelled(Exception):
    """Raised in the worker thread of an a* call whose task was cancelled, once its jobs are."""


def raise_if_cancelled(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise CallCancelled


async def in_thread(call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run a synchronous call in a thread. When the awaiting task is cancelled, the call cancels
    its jobs (as on Ctrl-C in a synchronous call); CancelledError follows once it has."""
    cancel = threading.Event()
    context = contextvars.copy_context()
    context.run(CANCEL.set, cancel)
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, functools.partial(context.run, call, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        # The worker thread must stop paying before the caller moves on (or the loop closes).
        with contextlib.suppress(Exception):
            await future
        raise
