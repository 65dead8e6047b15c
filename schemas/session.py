"""The console session's bodies (``/api/session``): sign in with a token, get a session.

The token travels once, in the sign-in body (never in a URL), as a ``SecretStr`` so that no
``repr`` or validation error can show it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

Role = Literal["agent", "supervisor"]
MAX_NAME_LENGTH = 100  # as an audit record's actor (omniroute.domain.supervisor)


class SessionCreate(BaseModel):
    """Sign in: an agent's token (an agent session) or the admin token (a supervisor's)."""

    model_config = ConfigDict(extra="forbid")

    token: Annotated[SecretStr, Field(min_length=1, max_length=512)]
    name: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=MAX_NAME_LENGTH,
            description="display name; a supervisor's actions are audited under it"
            " (default: the agent's name, or admin)",
        ),
    ] = None

    @field_validator("name")
    @classmethod
    def _printable(cls, name: str | None) -> str | None:
        if name is not None and not name.isprintable():
            raise ValueError("a name is printable characters only")
        return name


class SessionOut(BaseModel):
    """The session the cookie holds; ``csrf_token`` goes in ``X-CSRF-Token`` on every
    POST, PUT, PATCH and DELETE made with the cookie."""

    role: Role
    agent_id: uuid.UUID | None
    name: str
    csrf_token: str
    expires_at: datetime
