"""A small FAQ bot speaking Rasa's REST channel protocol: the bot omniroute's demo puts in front
of the agents, and a template for your own.

Run::

    python examples/faq_bot.py [--host 127.0.0.1] [--port 5005] [--token-env FAQ_BOT_TOKEN]

and point a workstream's ``bot.url`` at ``http://<host>:<port>/webhooks/rest/webhook``. A real
Rasa server (``rasa run`` with ``rest:`` in credentials.yml) answers the same requests.

The protocol is Rasa's REST channel (RestInput), as documented at
https://rasa.com/docs/reference/channels/your-own-website/ ("Request and Response Format") and
https://rasa.com/docs/reference/api/pro/http-api/channel-webhooks/post-user-message-from-a-rest-channel:
``POST /webhooks/rest/webhook`` with ``{"sender": <id>, "message": <text>, "metadata": {...}}``
answers a JSON list of bot messages ``{"recipient_id", "text"?, "image"?, "buttons"?,
"custom"?}``; a button's ``payload`` comes back as the next ``message``. Every Rasa channel
also answers ``GET /webhooks/<channel>/`` with ``{"status": "ok"}`` (its health route), kept
here for health checks.

What it does: answers opening hours, order status (asking for the order number and remembering
it) and the returns/refund policy in Portuguese and English, offers the topics as buttons, and
hands the conversation to agents — ``custom: {"handoff": true, "variables", "skills",
"priority"}`` — when the customer asks for a person ("agent", "atendente", "human", "falar com
alguém", …) or after two messages in a row it did not understand. A thank-you or goodbye
("obrigado", "thanks", "tchau") ends the conversation: ``custom: {"resolved": true}``.
omniroute merges the variables into the conversation's context, so routing rules can use
``topic`` and ``order``.

Memory is per sender (omniroute sends the conversation id), in process, bounded; a repeated
``metadata.message_id`` (omniroute asking again after a failure) gets the same answer again
instead of a second turn. Rasa itself takes a ``?token=`` query parameter for its HTTP API;
this bot reads ``Authorization: Bearer`` instead, so the token never sits in a URL or a log.
"""

from __future__ import annotations

import argparse
import hmac
import os
import re
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

REST_PATH = "/webhooks/rest/webhook"
HEALTH_PATH = "/webhooks/rest/"
# Senders remembered and answers kept for repeated message ids: oldest forgotten first.
MEMORY_LIMIT = 10_000
ANSWER_LIMIT = 10_000
# Messages in a row the bot did not understand before it hands off.
MISSES_BEFORE_HANDOFF = 2

Language = Literal["pt", "en"]
Topic = Literal["hours", "orders", "returns"]
TOPICS: dict[str, Topic] = {"hours": "hours", "orders": "orders", "returns": "returns"}


@dataclass
class Memory:
    """What the bot knows about one sender (one omniroute conversation)."""

    language: Language | None = None
    topic: Topic | None = None
    order: str | None = None
    awaiting_order: bool = False
    misses: int = 0


@dataclass
class Bot:
    """The bot's state: per-sender memories and the answers given per message id."""

    token: str | None
    memories: OrderedDict[str, Memory] = field(default_factory=OrderedDict)
    answers: OrderedDict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=OrderedDict)

    def memory(self, sender: str) -> Memory:
        memory = self.memories.pop(sender, None) or Memory()
        self.memories[sender] = memory
        while len(self.memories) > MEMORY_LIMIT:
            self.memories.popitem(last=False)
        return memory

    def remember_answer(self, key: tuple[str, str], answer: list[dict[str, Any]]) -> None:
        self.answers[key] = answer
        while len(self.answers) > ANSWER_LIMIT:
            self.answers.popitem(last=False)


BOT = web.AppKey("bot", Bot)

# --- what the customer said ---------------------------------------------------------------

PAYLOADS: dict[str, str] = {
    "/hours": "hours",
    "/order": "orders",
    "/returns": "returns",
    "/agent": "agent",
}
# Whole words (accents folded, lower case) that name a topic.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "greeting": ("oi", "ola", "hello", "hi", "hey", "bom", "boa", "menu", "ajuda", "help"),
    "agent": ("agent", "atendente", "human", "humano", "person", "pessoa", "operator"),
    "thanks": ("obrigado", "obrigada", "valeu", "thanks", "thank", "tchau", "bye"),
    "hours": ("horario", "horarios", "hours", "open", "abre", "aberto", "funciona", "opening"),
    "orders": ("pedido", "pedidos", "order", "orders", "entrega", "delivery", "rastrear", "track"),
    "returns": (
        *("devolucao", "devolucoes", "devolver", "reembolso", "reembolsos", "troca", "trocas"),
        *("trocar", "return", "returns", "refund", "refunds", "exchange"),
    ),
}
PHRASES_FOR_AGENT = (
    "falar com alguem",
    "falar com uma pessoa",
    "talk to someone",
    "speak to someone",
    "talk to a person",
)
# Words that tell the two languages apart (accents folded), written as prose to stay readable.
PORTUGUESE = frozenset(
    "ola oi bom dia boa tarde noite pedido horario devolucao reembolso troca atendente falar "  # noqa: SIM905
    "alguem obrigado obrigada quero meu minha nao sim ajuda voce qual quando onde esta".split()
)
ENGLISH = frozenset(
    "hello hi hey good morning order hours return refund agent human please thanks thank my "  # noqa: SIM905
    "want help when what where is the your you".split()
)
ORDER_NUMBER = re.compile(r"#?\b(\d{4,12})\b")


def fold(text: str) -> str:
    """Lower case without accents, so "Horário" and "horario" read the same."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", fold(text))


def intent(text: str) -> str | None:
    """``greeting``, ``thanks``, ``agent``, ``hours``, ``orders``, ``returns`` or ``None`` (not
    understood)."""
    stripped = text.strip()
    if stripped in PAYLOADS:
        return PAYLOADS[stripped]
    folded = " ".join(words(text))
    if any(phrase in folded for phrase in PHRASES_FOR_AGENT):
        return "agent"
    said = set(folded.split())
    found = [name for name, keywords in KEYWORDS.items() if said.intersection(keywords)]
    # A greeting with a question ("oi, qual o horário?") is the question; asking for a
    # person wins over any topic.
    topics = [name for name in found if name not in ("greeting", "thanks")]
    if not topics and "thanks" in found:
        return "thanks"
    return topics[0] if topics else (found[0] if found else None)


def language_of(text: str, memory: Memory, metadata: dict[str, Any]) -> Language:
    """The text's own cues first, then what the sender wrote before, then the conversation's
    language from omniroute's metadata (e.g. "pt-BR"), then English."""
    # A button's payload ("/order") is ours, not the customer's words.
    said = set() if text.strip() in PAYLOADS else set(words(text))
    pt, en = len(said & PORTUGUESE), len(said & ENGLISH)
    if pt != en:
        return "pt" if pt > en else "en"
    if memory.language is not None:
        return memory.language
    declared = str(metadata.get("language") or "").lower()
    return "pt" if declared.startswith("pt") else "en"


# --- what the bot says --------------------------------------------------------------------

TEXTS: dict[str, dict[Language, str]] = {
    "menu": {
        "pt": "Olá! Posso ajudar com horário de atendimento, status do pedido ou trocas e "
        'devoluções. Ou escreva "atendente" para falar com uma pessoa.',
        "en": "Hi! I can help with opening hours, order status, or returns and refunds. "
        'Or write "agent" to talk to a person.',
    },
    "not_understood": {
        "pt": "Desculpe, não entendi. Escolha um assunto:",
        "en": "Sorry, I did not get that. Pick a topic:",
    },
    "hours": {
        "pt": "Atendemos de segunda a sexta, das 8h às 18h, e aos sábados das 9h às 13h.",
        "en": "We are open Monday to Friday, 8am to 6pm, and Saturdays 9am to 1pm.",
    },
    "ask_order": {
        "pt": "Qual é o número do seu pedido?",
        "en": "What is your order number?",
    },
    "ask_order_again": {
        "pt": "Não encontrei um número de pedido. Envie só os números, por exemplo 12345.",
        "en": "I could not find an order number. Send just the digits, for example 12345.",
    },
    "order_status": {
        "pt": 'Pedido {order}: {status}. Se precisar de mais ajuda, escreva "atendente".',
        "en": 'Order {order}: {status}. If you need more help, write "agent".',
    },
    "returns": {
        "pt": "Você pode trocar ou devolver em até 30 dias após o recebimento. O reembolso "
        "sai em até 10 dias úteis depois que recebemos o produto.",
        "en": "You can return or exchange within 30 days of delivery. Refunds are paid within "
        "10 business days after we receive the item.",
    },
    "resolved": {
        "pt": "Por nada! Se precisar, é só escrever. Até logo!",
        "en": "You are welcome! Write any time. Bye!",
    },
    "handoff": {
        "pt": "Certo, vou transferir você para um atendente.",
        "en": "Sure, I am transferring you to an agent.",
    },
}
ORDER_STATUSES: dict[Language, tuple[str, ...]] = {
    "pt": ("em separação", "saiu para entrega", "entregue"),
    "en": ("being prepared", "out for delivery", "delivered"),
}
BUTTONS: dict[Language, list[dict[str, str]]] = {
    "pt": [
        {"title": "Horário", "payload": "/hours"},
        {"title": "Meu pedido", "payload": "/order"},
        {"title": "Trocas e devoluções", "payload": "/returns"},
        {"title": "Falar com atendente", "payload": "/agent"},
    ],
    "en": [
        {"title": "Opening hours", "payload": "/hours"},
        {"title": "My order", "payload": "/order"},
        {"title": "Returns and refunds", "payload": "/returns"},
        {"title": "Talk to an agent", "payload": "/agent"},
    ],
}
# What an escalation asks of routing: order questions need the orders skill, and a return
# (money going back) waits less than a status question.
SKILLS: dict[Topic, dict[str, int]] = {"orders": {"orders": 3}, "returns": {"orders": 3}}
PRIORITIES: dict[Topic, int] = {"orders": 3, "returns": 5}


def order_status(order: str, language: Language) -> str:
    """A stand-in lookup: the same order always gets the same status."""
    statuses = ORDER_STATUSES[language]
    return statuses[int(order) % len(statuses)]


def handoff(memory: Memory, language: Language, reason: str) -> list[dict[str, Any]]:
    """The hand-off: a text for the customer, then omniroute's ``custom`` escalation."""
    variables: dict[str, Any] = {
        "topic": memory.topic or "general",
        "language": language,
        "handoff_reason": reason,
    }
    if memory.order is not None:
        variables["order"] = memory.order
    custom: dict[str, Any] = {"handoff": True, "variables": variables}
    if memory.topic is not None and memory.topic in SKILLS:
        custom["skills"] = SKILLS[memory.topic]
        custom["priority"] = PRIORITIES[memory.topic]
    return [{"text": TEXTS["handoff"][language]}, {"custom": custom}]


def _not_a_topic(found: str, memory: Memory, language: Language) -> list[dict[str, Any]] | None:
    """The answer to a request for a person, a greeting or a thank-you; None for a topic."""
    if found == "agent":
        return handoff(memory, language, "customer_asked")
    if found == "greeting":
        return [{"text": TEXTS["menu"][language], "buttons": BUTTONS[language]}]
    if found == "thanks":  # the customer is done: omniroute closes it (resolved_by_bot)
        return [{"text": TEXTS["resolved"][language]}, {"custom": {"resolved": True}}]
    return None


def reply(memory: Memory, text: str, metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """One turn: updates ``memory`` and returns the bot messages (without recipient_id)."""
    language = memory.language = language_of(text, memory, metadata)
    found = intent(text)
    number = ORDER_NUMBER.search(text)
    if found is None and memory.awaiting_order and number is None:
        memory.misses += 1
        if memory.misses >= MISSES_BEFORE_HANDOFF:
            return handoff(memory, language, "not_understood")
        return [{"text": TEXTS["ask_order_again"][language]}]
    if found is None and number is not None and (memory.awaiting_order or memory.topic is None):
        found = "orders"
    if found is None:
        memory.misses += 1
        if memory.misses >= MISSES_BEFORE_HANDOFF:
            return handoff(memory, language, "not_understood")
        return [{"text": TEXTS["not_understood"][language], "buttons": BUTTONS[language]}]
    memory.misses = 0
    if (answer := _not_a_topic(found, memory, language)) is not None:
        return answer
    memory.topic = TOPICS[found]
    memory.awaiting_order = False
    if found == "hours":
        return [{"text": TEXTS["hours"][language]}]
    if found == "returns":
        return [{"text": TEXTS["returns"][language]}]
    if number is not None:
        memory.order = number.group(1)
    if memory.order is None:
        memory.awaiting_order = True
        return [{"text": TEXTS["ask_order"][language]}]
    status = order_status(memory.order, language)
    return [{"text": TEXTS["order_status"][language].format(order=memory.order, status=status)}]


# --- HTTP ---------------------------------------------------------------------------------


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "details": {}}}, status=status
    )


def authorized(bot: Bot, request: web.Request) -> bool:
    if bot.token is None:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {bot.token}".encode())


async def webhook(request: web.Request) -> web.Response:
    """Rasa's REST webhook: one customer message in, the bot's messages out."""
    bot = request.app[BOT]
    if not authorized(bot, request):
        return error(401, "unauthorized", "a valid bearer token is required")
    try:
        body = await request.json()
    except ValueError:
        return error(400, "invalid_json", "the body is not JSON")
    if not (
        isinstance(body, dict)
        and isinstance(body.get("sender"), str)
        and isinstance(body.get("message"), str)
    ):
        return error(400, "invalid_message", 'expected {"sender": str, "message": str}')
    sender: str = body["sender"]
    given = body.get("metadata")
    metadata: dict[str, Any] = given if isinstance(given, dict) else {}
    message_id = metadata.get("message_id")
    key = (sender, str(message_id)) if message_id is not None else None
    if key is not None and key in bot.answers:
        return web.json_response(bot.answers[key])  # the same message asked again
    messages = reply(bot.memory(sender), body["message"], metadata)
    answer = [{"recipient_id": sender, **message} for message in messages]
    if key is not None:
        bot.remember_answer(key, answer)
    return web.json_response(answer)


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(token: str | None) -> web.Application:
    """The bot as an aiohttp application; with ``token``, requests must carry
    ``Authorization: Bearer <token>`` (else 401)."""
    app = web.Application()
    app[BOT] = Bot(token=token or None)
    app.router.add_post(REST_PATH, webhook)
    app.router.add_get(HEALTH_PATH, health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5005)
    parser.add_argument(
        "--token-env",
        default="FAQ_BOT_TOKEN",
        help="environment variable holding the bearer token (unset or empty: no check)",
    )
    args = parser.parse_args()
    token = os.environ.get(args.token_env) or None
    web.run_app(create_app(token), host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
