"""Baseline (b): a minimal hand-written aiohttp + aio-pika handler.

It validates X-Twilio-Signature with twilio's RequestValidator over the public URL and
publishes a persistent message with publisher confirms before answering 200; 403 on a bad
signature, 503 if the publish is not confirmed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import uvloop
from aiohttp import web
from twilio.request_validator import RequestValidator

from bench.servers.common import EXCHANGE, ROUTING_KEY, ServerArgs, event_body, parse_args

TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
EXCHANGE_KEY = web.AppKey("exchange", aio_pika.abc.AbstractExchange)


def make_app(args: ServerArgs) -> web.Application:
    validator = RequestValidator(args.token)

    async def inbound(request: web.Request) -> web.Response:
        form = await request.post()
        url = args.public_url + request.path_qs
        if not validator.validate(url, form, request.headers.get("X-Twilio-Signature", "")):
            return web.Response(status=403)
        message = aio_pika.Message(
            event_body({k: str(v) for k, v in form.items()}),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await request.app[EXCHANGE_KEY].publish(message, routing_key=ROUTING_KEY)
        except Exception:
            return web.Response(status=503)
        return web.Response(text=TWIML, content_type="text/xml")

    async def broker(app: web.Application) -> AsyncIterator[None]:
        connection = await aio_pika.connect_robust(args.amqp_url)
        channel = await connection.channel(publisher_confirms=True)
        app[EXCHANGE_KEY] = await channel.get_exchange(EXCHANGE)
        yield
        await connection.close()

    app = web.Application()
    app.cleanup_ctx.append(broker)
    app.router.add_post("/twilio/{account}/inbound", inbound)
    return app


def main() -> None:
    args = parse_args("bench.servers.minimal")
    uvloop.install()
    web.run_app(make_app(args), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
