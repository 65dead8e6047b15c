"""structlog set-up: JSON (default) or console, context bound through contextvars.

Secrets are kept out by construction (they are ``SecretStr`` everywhere) and, as a second
line, a processor masks any field whose name says it holds a secret.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

_SECRET_KEY = re.compile(r"(token|secret|password|authorization|signature)", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@")


def _mask_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if _SECRET_KEY.search(key) and value is not None:
            event[key] = "***"
        elif isinstance(value, str) and "://" in value:
            event[key] = _URL_CREDENTIALS.sub(r"\g<scheme>***:***@", value)
    return event


def configure_logging(
    log_format: str = "json", level: str = "info", *, cache: bool = False
) -> None:
    """Configure structlog and the stdlib root logger once per process.

    ``cache`` binds each logger to this configuration on first use (what a service wants:
    cheaper log calls); tests leave it off so that they can capture logs.
    """
    log_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    json_output = log_format == "json"
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=orjson.dumps)
        if json_output
        else structlog.dev.ConsoleRenderer()
    )
    factory: Any = (
        structlog.BytesLoggerFactory(file=sys.stderr.buffer)
        if json_output
        else structlog.PrintLoggerFactory(file=sys.stderr)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(log_level),
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )
    logging.basicConfig(level=max(log_level, logging.WARNING), stream=sys.stderr)
