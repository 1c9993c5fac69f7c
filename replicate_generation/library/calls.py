"""The module-level functions: each mode, and its a* form, on one default client per process."""

from __future__ import annotations

import atexit
import threading
from collections.abc import Sequence
from typing import Any

from replicate_generation.library.cancellation import in_thread
from replicate_generation.library.client import BatchClient
from replicate_generation.library.results import FilePath, Request, Result

_default: BatchClient | None = None
_default_lock = threading.Lock()


def default_client() -> BatchClient:
    """The client behind the module-level functions: built on first use from the environment,
    closed when the interpreter exits."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = BatchClient()
            atexit.register(_default.close)
        return _default


def generate(prompt: str | None, model_name: str, output_filepath: FilePath | None = None, *,
             token: str | None = None, **kwargs: Any) -> Result:
    """`BatchClient.generate` on the default client."""
    return default_client().generate(prompt, model_name, output_filepath, token=token, **kwargs)


def generate_batch(prompts: Sequence[str], model_name: str,
                   output_filepaths: Sequence[FilePath | None] | None = None, *,
                   token: str | None = None, **kwargs: Any) -> list[Result]:
    """`BatchClient.generate_batch` on the default client."""
    return default_client().generate_batch(prompts, model_name, output_filepaths, token=token,
                                           **kwargs)


def generate_mixed(requests: Sequence[Request], *, token: str | None = None,
                   **kwargs: Any) -> list[Result]:
    """`BatchClient.generate_mixed` on the default client."""
    return default_client().generate_mixed(requests, token=token, **kwargs)


async def agenerate(*args: Any, **kwargs: Any) -> Result:
    return await in_thread(generate, *args, **kwargs)


async def agenerate_batch(*args: Any, **kwargs: Any) -> list[Result]:
    return await in_thread(generate_batch, *args, **kwargs)


async def agenerate_mixed(*args: Any, **kwargs: Any) -> list[Result]:
    return await in_thread(generate_mixed, *args, **kwargs)
