"""Twilio's list paging: ``PageSize``, ``Page``, ``PageToken`` and the page URIs clients follow.

A Twilio list answer carries its records under one key (``messages``, ``media_list``) beside
``first_page_uri``, ``next_page_uri`` (null on the last page), ``previous_page_uri``,
``page``, ``page_size``, ``start``, ``end`` and ``uri``; the URIs are paths relative to the
API's base URL, which twilio-python joins to ``client.api.base_url`` and follows.

``PageToken`` is a cursor, as on Twilio: ``PA<sid>`` is the page after the record ``sid``
and ``PB<sid>`` the page before it, so records added while a client pages (newest first)
do not shift the pages it has yet to read. ``Page`` is only the client's page counter; it
is used as an offset only without a token (or when the token's record is gone).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
#: Upper bound of the ``Page`` counter, so a silly value cannot become a huge offset.
MAX_PAGE_NUMBER = 2**31
AFTER = "PA"
BEFORE = "PB"


class Identified(Protocol):
    """A listed record: anything with a Twilio sid."""

    @property
    def sid(self) -> str:
        """The record's sid."""
        ...


Record = TypeVar("Record", bound=Identified)


def _whole(raw: str | None, default: int, low: int, high: int) -> int:
    # A value that is not a whole number falls back to the default; one out of range is
    # clamped into it (Twilio caps PageSize at 1000).
    try:
        value = int(raw) if raw is not None else default
    except ValueError:
        value = default
    return min(max(value, low), high)


@dataclass(frozen=True)
class PageRequest:
    """The paging parameters of one list request."""

    page: int = 0
    page_size: int = DEFAULT_PAGE_SIZE
    token: str | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> PageRequest:
        """Read ``Page``, ``PageSize`` and ``PageToken`` from a query string."""
        return cls(
            page=_whole(query.get("Page"), 0, 0, MAX_PAGE_NUMBER),
            page_size=_whole(query.get("PageSize"), DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE),
            token=query.get("PageToken") or None,
        )

    def bounds(self, records: Sequence[Record]) -> tuple[int, int]:
        """Return ``(start, stop)``: the slice of ``records`` this page holds."""
        if self.token is not None:
            prefix, sid = self.token[:2], self.token[2:]
            index = next((i for i, r in enumerate(records) if r.sid == sid), None)
            if index is not None and prefix == AFTER:
                return index + 1, min(index + 1 + self.page_size, len(records))
            if index is not None and prefix == BEFORE:
                return max(index - self.page_size, 0), index
        start = min(self.page * self.page_size, len(records))
        return start, min(start + self.page_size, len(records))


def _uri(path: str, filters: Sequence[tuple[str, str]], **paging: str | int) -> str:
    params = [*filters, *((name, str(value)) for name, value in paging.items())]
    return f"{path}?{urlencode(params)}"


def page_body(
    key: str,
    records: Sequence[Record],
    render: Callable[[Record], dict[str, Any]],
    path: str,
    filters: Sequence[tuple[str, str]],
    request: PageRequest,
) -> dict[str, Any]:
    """Return one page of ``records`` (already filtered and ordered) as Twilio lists them.

    ``filters`` are the request's filter parameters, repeated in every page URI so that a
    client following ``next_page_uri`` keeps them.
    """
    start, stop = request.bounds(records)
    shown = records[start:stop]
    size, page = request.page_size, request.page
    token = {"PageToken": request.token} if request.token else {}
    next_uri = previous_uri = None
    if shown and stop < len(records):
        next_uri = _uri(
            path, filters, PageSize=size, Page=page + 1, PageToken=AFTER + shown[-1].sid
        )
    if shown and start > 0:
        previous_uri = _uri(
            path, filters, PageSize=size, Page=max(page - 1, 0), PageToken=BEFORE + shown[0].sid
        )
    first = page * size
    return {
        key: [render(record) for record in shown],
        "end": first + max(len(shown) - 1, 0),
        "first_page_uri": _uri(path, filters, PageSize=size, Page=0),
        "next_page_uri": next_uri,
        "page": page,
        "page_size": size,
        "previous_page_uri": previous_uri,
        "start": first,
        "uri": _uri(path, filters, PageSize=size, Page=page, **token),
    }
