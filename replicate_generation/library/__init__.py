"""Generate with Replicate models from your own Python code, in-process: no server needed.

`generate`, `generate_batch`, `generate_mixed` (and a* forms) run as jobs on the service's engine,
sharing limits through `STATE_FILE`; files never silently replace another (docs/library.md).
"""

from replicate_generation.errors import InvalidName, InvalidRequest, OutputExists
from replicate_generation.library.calls import (
    agenerate,
    agenerate_batch,
    agenerate_mixed,
    default_client,
    generate,
    generate_batch,
    generate_mixed,
)
from replicate_generation.library.client import BatchClient
from replicate_generation.library.results import GenerationFailed, Request, Result
from replicate_generation.library.status import global_status, load_settings

__all__ = [
    "BatchClient",
    "GenerationFailed",
    "InvalidName",
    "InvalidRequest",
    "OutputExists",
    "Request",
    "Result",
    "agenerate",
    "agenerate_batch",
    "agenerate_mixed",
    "default_client",
    "generate",
    "generate_batch",
    "generate_mixed",
    "global_status",
    "load_settings",
]
