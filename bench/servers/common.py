"""What the baseline servers share: arguments, the signed URL and the event they publish.

Baselines (b) and (c) publish to omniroute's own exchange with the routing key
``message.received``, so the broker does the same work for them as for the router (the same
two quorum queues receive each message); only the HTTP handler differs.
"""

from __future__ import annotations

import argparse
import time
import uuid
from dataclasses import dataclass

import orjson

EXCHANGE = "omniroute.events"
ROUTING_KEY = "message.received"


@dataclass(frozen=True)
class ServerArgs:
    port: int
    amqp_url: str
    token: str
    public_url: str


def parse_args(prog: str) -> ServerArgs:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--amqp-url", default="")
    parser.add_argument("--token", default="")
    parser.add_argument("--public-url", default="")
    args = parser.parse_args()
    return ServerArgs(args.port, args.amqp_url, args.token, args.public_url)


def event_body(form: dict[str, str]) -> bytes:
    """A minimal event: id, type, time and the form as received."""
    return orjson.dumps(
        {
            "id": str(uuid.uuid4()),
            "type": ROUTING_KEY,
            "occurred_at": time.time(),
            "data": form,
        }
    )
