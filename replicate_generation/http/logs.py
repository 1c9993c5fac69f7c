"""What the service's log lines may hold: no configured secret or Replicate-shaped token, and no
control character a client sent (a forged line). Installed on the root and gunicorn's handlers."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from replicate_generation.clients import TOKEN_SHAPED
from replicate_generation.settings import Settings

# gunicorn's own loggers: its access log writes the percent-decoded request path verbatim.
GUNICORN_LOGGERS = ("gunicorn.access", "gunicorn.error")


class RedactSecrets(logging.Filter):
    """Last line of defence: no configured secret or Replicate-shaped token reaches a log."""

    TOKEN = TOKEN_SHAPED

    def __init__(self, secrets: Iterable[str | None]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.TOKEN.sub("r8_[redacted]", message)
        for secret in self._secrets:
            cleaned = cleaned.replace(secret, "[redacted]")
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class EscapeControlCharacters(logging.Filter):
    """No text a client sent (a path, a prompt) can start a forged log line or hide in one."""

    UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069"
                        "\ufeff\ud800-\udfff]")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = self.escape(message)
        if escaped != message:
            record.msg, record.args = escaped, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._indented(logging.Formatter().formatException(record.exc_info))
        return True

    @classmethod
    def escape(cls, text: str) -> str:
        return cls.UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)

    @classmethod
    def _indented(cls, traceback: str) -> str:
        # Every line after the first indented: an exception's message cannot pose as a record.
        return "\n  ".join(cls.escape(line) for line in traceback.split("\n"))


def configure_logging(settings: Settings) -> None:
    """Set the level and install both filters, replacing an earlier app's."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root.setLevel(settings.log_level)
    # httpx logs every request at INFO: one line per poll would drown the service's own lines.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    filters = (EscapeControlCharacters(),
               RedactSecrets([settings.replicate_api_token, settings.admin_api_key]))
    loggers = [root, *(logging.getLogger(name) for name in GUNICORN_LOGGERS)]
    for handler in {h for logger in loggers for h in logger.handlers}:
        _replace_filters(handler, filters)


def _replace_filters(handler: logging.Handler, filters: tuple[logging.Filter, ...]) -> None:
    """Install these filters on the handler, dropping an earlier app's of the same kinds."""
    kinds = tuple(type(f) for f in filters)
    for old in [f for f in handler.filters if isinstance(f, kinds)]:
        handler.removeFilter(old)
    for new in filters:
        handler.addFilter(new)
