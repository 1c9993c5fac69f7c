"""Generate images, videos and audio with Replicate models within each account's limits.

The same engine three ways: the HTTP service (`replicate_generation.app:create_app()` under
gunicorn), the in-process library (`replicate_generation.library`) and the CLI
(`replicate-generation`, or `python -m replicate_generation`). Users of the old
`replicate-batch-process` package change one import line to `replicate_generation.compat`.
"""

__version__ = "3.2.0"
