"""``OMNIROUTE_LOG_FORMAT=json``: every line a process writes to stderr is one JSON object,
what libraries log through the standard library included, tracebacks as a field."""

from __future__ import annotations

import asyncio
import json
import sys

SCRIPT = """
import logging
import structlog
from omniroute.infra.logging import configure_logging

configure_logging("json", "info")
structlog.get_logger("omniroute.test").info("ours.event", token="hunter2", n=1)
try:
    raise ConnectionError("broker gone")
except ConnectionError:
    logging.getLogger("aiormq.connection").exception("error when creating transport")
logging.getLogger("asyncpg.pool").warning("pool %s closing", "main")
logging.getLogger("aiohttp.access").info("below the stdlib floor: not shown")
"""


async def test_json_format_makes_every_stderr_line_json_including_library_logs() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SCRIPT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    lines = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert [line["event"] for line in lines] == [
        "ours.event",
        "error when creating transport",
        "pool main closing",
    ]
    ours, library_error, library_warning = lines
    assert ours["token"] == "***"
    assert library_error["logger"] == "aiormq.connection"
    assert library_error["level"] == "error"
    assert "ConnectionError: broker gone" in library_error["exception"]
    assert "Traceback" in library_error["exception"]
    assert library_warning["level"] == "warning"
    assert all("timestamp" in line for line in lines)
