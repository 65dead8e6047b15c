"""The console's pages and files: served from the package with the right types (module
scripts need a JavaScript MIME type), revalidated, under a strict CSP, and nothing outside
the console folder."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from router.console_pages import console_files

Client = TestClient[Any, Any]


class _Page(HTMLParser):
    """The scripts, style sheets and inline code of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.sheets: list[str | None] = []
        self.inline: list[str] = []
        self.labels: dict[str, str] = {}
        self.ids: dict[str, dict[str, str | None]] = {}
        self._in_script = False
        self._label_for: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if attributes.get("id"):
            self.ids[str(attributes["id"])] = attributes | {"tag": tag}
        if any(name == "style" or name.startswith("on") for name, _ in attrs):
            self.inline.append(f"<{tag} {attrs}>")
        if tag == "script":
            self.scripts.append(attributes)
            self._in_script = True
        elif tag == "link" and attributes.get("rel") == "stylesheet":
            self.sheets.append(attributes.get("href"))
        elif tag == "style":
            self.inline.append("<style>")
        elif tag == "label":
            self._label_for = attributes.get("for")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False
        elif tag == "label":
            self._label_for = None

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(data.strip())
        if self._label_for and data.strip():
            self.labels[self._label_for] = self.labels.get(self._label_for, "") + data.strip()


async def _page(router: Client, path: str) -> tuple[Any, _Page]:
    response = await router.get(path)
    assert response.status == 200, path
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    page = _Page()
    page.feed(await response.text())
    return response, page


async def test_the_agent_page_runs_only_its_own_module_under_a_strict_csp(router: Client) -> None:
    response, page = await _page(router, "/console")
    csp = {
        directive.split()[0]: directive.split()[1:]
        for directive in response.headers["Content-Security-Policy"].split(";")
    }
    assert csp["default-src"] == ["'self'"]
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["img-src"] == ["'self'", "data:", "blob:"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    # Inline code would be refused by that CSP: the page has none.
    assert page.inline == []
    assert page.scripts == [{"type": "module", "src": "/console/static/agent.js"}]
    assert "/console/static/console.css" in page.sheets
    assert "/console/static/conversation.css" in page.sheets


async def test_the_sign_in_form_is_labelled_and_keeps_no_token(router: Client) -> None:
    _, page = await _page(router, "/console")
    assert page.labels["signin-token"] == "Agent token"
    token = page.ids["signin-token"]
    assert (token["tag"], token["type"], token["autocomplete"]) == ("input", "password", "off")
    assert page.labels["presence"] == "Presence"
    assert page.ids["presence"]["tag"] == "select"
    assert page.ids["conversation"]["tag"] == "section"


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("api.js", "text/javascript; charset=utf-8"),
        ("agent.js", "text/javascript; charset=utf-8"),
        ("console.css", "text/css; charset=utf-8"),
    ],
)
async def test_files_are_served_with_their_type(
    router: Client, name: str, content_type: str
) -> None:
    response = await router.get(f"/console/static/{name}")
    assert response.status == 200
    assert response.headers["Content-Type"] == content_type
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert await response.read() == console_files().joinpath(name).read_bytes()


async def test_files_are_revalidated_by_etag(router: Client) -> None:
    first = await router.get("/console/static/api.js")
    etag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == "no-cache"
    again = await router.get("/console/static/api.js", headers={"If-None-Match": etag})
    assert again.status == 304 and await again.read() == b""
    stale = await router.get("/console/static/api.js", headers={"If-None-Match": '"old"'})
    assert stale.status == 200
    page = await router.get("/console", headers={"If-None-Match": f'"x", W/{etag}'})
    assert page.status == 200  # another file's tag does not match


@pytest.mark.parametrize(
    "path",
    [
        "/console/static/missing.js",
        "/console/static/..%2Fconsole_pages.py",
        "/console/static/%2E%2E%2F%2E%2E%2Fapp.py",
        "/console/static/..%5Capp.py",
        "/console/static/.hidden.js",
        "/console/static/README",  # no served kind
        "/console/static/agent.html%00.js",
    ],
)
async def test_nothing_else_is_served(router: Client, path: str) -> None:
    response = await router.get(path)
    assert response.status in (400, 404), path
    if response.status == 404:
        assert (await response.json())["error"]["code"] == "not_found"


async def test_the_supervisor_page_is_served_once_it_exists(router: Client) -> None:
    response = await router.get("/console/supervisor")
    if console_files().joinpath("supervisor.html").is_file():
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    else:
        assert response.status == 404


async def test_the_root_leads_to_the_console(router: Client) -> None:
    response = await router.get("/", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == "/console"
