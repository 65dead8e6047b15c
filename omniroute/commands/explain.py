"""``omniroute classify``: how the rules would classify a message, without a broker."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from datetime import UTC, datetime

from consumers.classify import build_context, compile_config, decide
from consumers.overflow import describe
from schemas.config import Config
from schemas.events import ConversationOpened
from schemas.twilio import split_address


def _overflow(config: Config, queue_name: str) -> str | None:
    queue = config.queue(queue_name)
    return describe(queue.overflow) if queue is not None and queue.overflow else None


def explain(config: Config, args: argparse.Namespace) -> int:
    """Print the trace of one classification; 2 if the number is not configured."""
    try:
        _, business = split_address(args.to)
        _, customer = split_address(args.sender)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    account = next((a for a in config.accounts if a.find_number(business)), None)
    number = account.find_number(business) if account else None
    if account is None or number is None:
        print(f"error: {business} is not configured under any account", file=sys.stderr)
        return 2
    at = datetime.fromisoformat(args.at) if args.at else datetime.now(UTC)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    opened = ConversationOpened(
        conversation_id=str(uuid.uuid4()),
        contact_id=str(uuid.uuid4()),
        business_number=business,
        customer=customer,
        workstream=number.workstream,
        profile_name=args.profile_name,
        first_message_id=str(uuid.uuid4()),
        first_message_sid="SM" + "0" * 32,
        first_message_body=args.body,
        has_media=args.media > 0,
        media_count=args.media,
        opened_at=at,
    )
    context = build_context(config, account.name, opened, at)
    decision = decide(config, compile_config(config), account.name, opened, at)
    result = decision.result
    if args.json:
        print(
            json.dumps(
                {
                    "context": context,
                    "queue": decision.queue,
                    "state": decision.state,
                    "skills": result.skills,
                    "priority": result.priority,
                    "severity": result.severity,
                    "language": result.language,
                    "variables": result.variables,
                    "out_of_hours": decision.out_of_hours,
                    "overflow": _overflow(config, decision.queue),
                    "notes": decision.notes,
                    **result.trace(),
                },
                default=str,
                indent=2,
            )
        )
        return 0
    print(f"account {account.name} · {number.name} ({business}) → workstream {number.workstream}")
    print("context: " + ", ".join(f"{k}={v!r}" for k, v in context.items() if v is not None))
    print("matched rules:" if result.matched else "matched rules: none")
    for match in result.matched:
        print(f"  ✓ {match.ruleset} / {match.rule}: {match.why}")
    if result.route:
        print(f"route: {result.route.rule}: {result.route.why}")
    else:
        print(f"route: no route rule matched → fallback queue {result.queue}")
    if decision.out_of_hours:
        print(
            f"queue: {result.queue} is closed at {at.isoformat()}: out-of-hours action "
            f"{decision.out_of_hours_action} → {decision.queue}, state {decision.state}"
        )
    else:
        print(f"queue: {decision.queue} (open) → state {decision.state}")
    rule = _overflow(config, decision.queue)
    if rule is not None:
        # Overflow depends on the queue's live load: it is checked when the work arrives.
        print(f"{decision.queue}: {rule} (checked on arrival against the live queue)")
    skills = ", ".join(f"{k}≥{v}" for k, v in result.skills.items()) or "none"
    print(
        f"skills: {skills}; priority {result.priority}; severity {result.severity}; "
        f"language {result.language}"
    )
    if result.variables:
        print("variables: " + ", ".join(f"{k}={v!r}" for k, v in result.variables.items()))
    for note in decision.notes:
        print(f"note: {note}")
    return 0
