"""The URLs Twilio calls: what ``omniroute accounts`` prints for the console, and the
StatusCallback every send carries, each with the same connection overrides.

Twilio's webhook connection overrides (https://www.twilio.com/docs/usage/webhooks/
webhooks-connection-overrides) ride in the URL's fragment, which Twilio strips before the
request and which is not part of the signed URL. Without them Twilio retries once, on a
failed connection only, never a 5xx or a read timeout. Retrying those is safe: omniroute
dedups webhooks on MessageSid and events on their ids.
ct/rt: connect and read timeouts in ms (the router answers within ingress_confirm_timeout);
tt: all attempts together; rc: retries; rp: which failures are retried.
"""

from __future__ import annotations

CONNECTION_OVERRIDES = "#ct=3000&rt=10000&tt=15000&rc=2&rp=ct,rt,5xx"


def inbound_url(public_base: str, account: str) -> str:
    """ "When a message comes in" for ``account``, with the connection overrides."""
    return f"{public_base}/twilio/{account}/inbound{CONNECTION_OVERRIDES}"


def status_url(public_base: str, account: str) -> str:
    """The status callback URL for ``account``, with the connection overrides."""
    return f"{public_base}/twilio/{account}/status{CONNECTION_OVERRIDES}"
