"""Baseline (a): a bare aiohttp handler that reads the form and answers 200."""

from __future__ import annotations

import uvloop
from aiohttp import web

from bench.servers.common import parse_args

TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


async def inbound(request: web.Request) -> web.Response:
    await request.post()
    return web.Response(text=TWIML, content_type="text/xml")


def main() -> None:
    args = parse_args("bench.servers.bare")
    app = web.Application()
    app.router.add_post("/twilio/{account}/inbound", inbound)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
