"""Baseline (c): the same minimal handler on FastAPI + FastStream under uvicorn.

uvicorn runs with uvloop and httptools (``uvicorn[standard]``), FastStream's RabbitBroker
publishes persistent messages with publisher confirms (its default).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request, Response
from faststream.rabbit import RabbitBroker, RabbitExchange
from faststream.rabbit.schemas import ExchangeType
from twilio.request_validator import RequestValidator

from bench.servers.common import EXCHANGE, ROUTING_KEY, ServerArgs, event_body, parse_args

TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def make_app(args: ServerArgs) -> FastAPI:
    broker = RabbitBroker(args.amqp_url, logger=None)
    exchange = RabbitExchange(EXCHANGE, type=ExchangeType.TOPIC, durable=True, declare=False)
    validator = RequestValidator(args.token)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await broker.start()
        yield
        await broker.stop()

    app = FastAPI(lifespan=lifespan)

    @app.post("/twilio/{account}/inbound")
    async def inbound(account: str, request: Request) -> Response:
        form = await request.form()
        url = args.public_url + request.url.path
        if not validator.validate(url, form, request.headers.get("X-Twilio-Signature", "")):
            return Response(status_code=403)
        try:
            await broker.publish(
                event_body({k: str(v) for k, v in form.items()}),
                exchange=exchange,
                routing_key=ROUTING_KEY,
                persist=True,
                content_type="application/json",
            )
        except Exception:
            return Response(status_code=503)
        return Response(content=TWIML, media_type="text/xml")

    return app


def main() -> None:
    args = parse_args("bench.servers.fast")
    uvicorn.run(
        make_app(args),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
