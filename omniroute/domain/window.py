"""WhatsApp's 24-hour customer-service window and the template catalog. Pure; the clock is
an argument.

Inside the window (strictly less than 24 h after the customer's last message, unless
Twilio told us it is closed) free text and media may be sent; media only when the
workstream lets agents send attachments, and only types WhatsApp accepts. Outside it,
only a template of the workstream's catalog.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from schemas.config import Template, Workstream

WINDOW = timedelta(hours=24)
MAX_MEDIA = 10
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
# What WhatsApp accepts through Twilio, by file extension of the media URL.
MEDIA_TYPES = {
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".mp4",
    ".3gp",
    ".mp3",
    ".ogg",
    ".amr",
    ".aac",
    ".m4a",
    ".opus",
    ".pdf",
    ".doc",
    ".docx",
    ".xls",
    ".xlsx",
    ".ppt",
    ".pptx",
    ".txt",
    ".csv",
    ".vcf",
}


@dataclass(frozen=True)
class Window:
    open: bool
    closes_at: datetime


def window(
    last_customer_message_at: datetime, now: datetime, closed_by_twilio_at: datetime | None = None
) -> Window:
    """The window at ``now``. A 63016 from Twilio after the last customer message closes it."""
    closes_at = last_customer_message_at + WINDOW
    if closed_by_twilio_at is not None and closed_by_twilio_at >= last_customer_message_at:
        return Window(False, min(closes_at, closed_by_twilio_at))
    return Window(now < closes_at, closes_at)


@dataclass(frozen=True)
class Rendered:
    template: str
    language: str
    content_sid: str
    text: str
    variables: dict[str, str]


@dataclass
class Verdict:
    """The gate's answer: allowed, or the reason and what the agent can do instead."""

    allowed: bool
    reason: str | None = None
    message: str | None = None
    templates: list[str] = field(default_factory=list)
    rendered: Rendered | None = None
    languages: list[str] = field(default_factory=list)  # a template's, when one was asked


def placeholders(text: str) -> list[str]:
    """The variable names of an approved text in order of first appearance."""
    seen: list[str] = []
    for name in PLACEHOLDER.findall(text):
        if name not in seen:
            seen.append(name)
    return seen


def language_for(template: Template, language: str | None) -> str:
    """The language ``template`` is sent in for a conversation in ``language``: that one,
    else one of its base language (pt for pt-BR), else the template's default."""
    if language is None:
        return template.default_language
    if language in template.languages:
        return language
    base = language.split("-")[0]
    for candidate in template.languages:
        if candidate.split("-")[0] == base:
            return candidate
    return template.default_language


def render(template: Template, language: str | None, variables: dict[str, str]) -> Rendered | str:
    """The template in the conversation's language (else its default), variables checked.

    Returns the rendered template, or a message saying what is wrong with the variables.
    """
    chosen = language_for(template, language)
    content = template.languages[chosen]
    names = placeholders(content.text)
    missing = [n for n in names if n not in variables]
    unknown = [n for n in variables if n not in names]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown {', '.join(unknown)}")
        return (
            f"template {template.name} ({chosen}) takes variables "
            f"{', '.join(names) or 'none'}: {'; '.join(parts)}"
        )
    text = PLACEHOLDER.sub(lambda m: str(variables[m.group(1)]), content.text)
    return Rendered(template.name, chosen, content.content_sid, text, dict(variables))


def media_problem(urls: list[str]) -> str | None:
    if len(urls) > MAX_MEDIA:
        return f"at most {MAX_MEDIA} attachments per message"
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            return f"{url!r} is not an http(s) URL"
        if PurePosixPath(parts.path).suffix.lower() not in MEDIA_TYPES:
            return f"{url!r}: WhatsApp does not accept this type of file"
    return None


def gate(
    workstream: Workstream | None,
    current: Window,
    *,
    text: str | None,
    media_urls: list[str],
    template: str | None,
    language: str | None,
    variables: dict[str, str],
    language_asked: bool = False,
) -> Verdict:
    """May this message be sent now? Free text/media inside the window, templates always.

    ``language_asked``: the sender named the template's language; one the template does
    not define is refused (``unknown_template_language``, naming those it has) instead of
    falling back, which is for the conversation's language only.
    """
    names = [t.name for t in workstream.templates] if workstream else []
    if template is not None:
        found = workstream.template(template) if workstream else None
        if found is None:
            return Verdict(
                False, "unknown_template", f"no template named {template!r}", templates=names
            )
        if language_asked and language not in found.languages:
            has = sorted(found.languages)
            return Verdict(
                False,
                "unknown_template_language",
                f"template {template} has no language {language!r}; it has {', '.join(has)}",
                templates=names,
                languages=has,
            )
        rendered = render(found, language, variables)
        if isinstance(rendered, str):
            return Verdict(False, "invalid_variables", rendered, templates=names)
        return Verdict(True, rendered=rendered)
    if not current.open:
        return Verdict(
            False,
            "window_closed",
            "the 24-hour customer-service window is closed: only a template can be sent "
            "until the customer writes again",
            templates=names,
        )
    if media_urls:
        if workstream is not None and not workstream.attachments.agents:
            return Verdict(
                False,
                "attachments_not_allowed",
                "this workstream does not let agents send attachments",
            )
        problem = media_problem(media_urls)
        if problem:
            return Verdict(False, "invalid_media", problem)
    if not (text or "").strip() and not media_urls:
        return Verdict(False, "empty_message", "send text, media or a template")
    return Verdict(True)
