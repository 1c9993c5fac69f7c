"""`replicate-generation run`: a CSV or JSONL file of requests, run resumably, here or on a service.

Resuming, stopping and the manifest's fields are described in docs/library.md.
"""

from replicate_generation.cli.batch.command import add_parser

__all__ = ["add_parser"]
