"""A load generator in its own process: signed Twilio inbound webhooks over N connections.

``python -m bench.loadgen URL TOKEN --count N --concurrency C`` signs every request before
the clock starts (each with its own MessageSid, the real inbound form shape), sends them
over ``C`` keep-alive connections, and prints one JSON line: requests per second, status
counts, and latency percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
from multidict import MultiDict
from twilio.request_validator import RequestValidator

BUSINESS = "+5511999990000"


def inbound_form(account_sid: str, sid: str, customer: str) -> list[tuple[str, str]]:
    return [
        ("SmsMessageSid", sid),
        ("NumMedia", "0"),
        ("ProfileName", "Maria"),
        ("MessageType", "text"),
        ("SmsSid", sid),
        ("WaId", customer.lstrip("+")),
        ("SmsStatus", "received"),
        ("Body", "Olá, meu pedido não chegou"),
        ("To", f"whatsapp:{BUSINESS}"),
        ("NumSegments", "1"),
        ("ReferralNumMedia", "0"),
        ("MessageSid", sid),
        ("AccountSid", account_sid),
        ("From", f"whatsapp:{customer}"),
        ("ApiVersion", "2010-04-01"),
    ]


def signed_requests(
    url: str, token: str, account_sid: str, count: int
) -> list[tuple[bytes, dict[str, str]]]:
    validator = RequestValidator(token)
    out = []
    for n in range(count):
        sid = "SM" + uuid.uuid4().hex
        form = inbound_form(account_sid, sid, f"+55119{n % 10**8:08d}")
        signature = validator.compute_signature(url, MultiDict(form))
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": str(signature),
            "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
        }
        out.append((urlencode(form).encode(), headers))
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


async def blast(
    url: str, requests: list[tuple[bytes, dict[str, str]]], concurrency: int
) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    queue = iter(requests)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for body, headers in queue:
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        key = str(response.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    key = type(exc).__name__
                latencies.append(time.perf_counter() - started)
                statuses[key] = statuses.get(key, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(requests),
        "seconds": round(elapsed, 3),
        "rps": round(len(requests) / elapsed, 1),
        "statuses": statuses,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("url")
    parser.add_argument("token")
    parser.add_argument("--account-sid", required=True)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    import uvloop

    warm = signed_requests(args.url, args.token, args.account_sid, args.warmup)
    measured = signed_requests(args.url, args.token, args.account_sid, args.count)
    uvloop.run(blast(args.url, warm, args.concurrency))
    result = uvloop.run(blast(args.url, measured, args.concurrency))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
