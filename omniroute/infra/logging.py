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
_OURS = "_omniroute_handler"  # marks the root handler this module installed
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
            *_shared_processors(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(log_level),
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )
    _route_stdlib(json_output, max(log_level, logging.WARNING))


def _shared_processors() -> list[Any]:
    return [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _mask_secrets,
    ]


def _route_stdlib(json_output: bool, level: int) -> None:
    """What libraries log through the standard library (aiormq, aio-pika, asyncpg, aiohttp)
    goes through structlog's processors too: with JSON output every line on stderr is one
    JSON object, a traceback included as its ``exception`` field."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
    if not json_output:
        logging.basicConfig(level=level, stream=sys.stderr)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *_shared_processors()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    setattr(handler, _OURS, True)
    root.addHandler(handler)
    root.setLevel(level)
