"""API bodies for sending messages (agents) — strict: unknown keys are 422s."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TemplateRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    language: str | None = Field(default=None, description="default: the conversation's")
    variables: dict[str, str] = Field(default_factory=dict)


class SendMessage(BaseModel):
    """Free text (and/or media URLs) or a template — not both."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, max_length=4096)
    media_urls: list[str] = Field(default_factory=list, max_length=10)
    template: TemplateRef | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SendMessage:
        if self.template is not None and (self.text or self.media_urls):
            raise ValueError("send either text/media or a template, not both")
        if self.template is None and not (self.text or "").strip() and not self.media_urls:
            raise ValueError("send text, media_urls or a template")
        return self

    @property
    def kind(self) -> str:
        if self.template is not None:
            return "template"
        return "media" if self.media_urls else "text"
