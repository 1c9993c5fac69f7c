"""Generate images, videos and audio with Replicate models within each account's limits.

One engine three ways: the HTTP service (`app:create_app()`), the library (`library`) and the CLI
(`replicate-generation`); users of the old `replicate-batch-process` import `compat` instead.
"""

__version__ = "3.2.0"
