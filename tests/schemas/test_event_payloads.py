"""The payload models list every field events really carry.

The code is read, not run: every place that builds an event (``new_event``, ``.caused``,
``Envelope(...)``) is found, and what it puts into ``data`` is checked against the model the
contract documents for that event type. Payloads are built from their model
(``Model(...).model_dump(mode="json")``); the few sites still building a dict by hand are
listed below until they are converted, and no new one may appear.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

import schemas.events
from schemas.events import PAYLOADS, Envelope, EventType

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("omniroute", "router", "consumers", "schemas")
BUILDERS = {"new_event", "caused", "Envelope"}

# Sites that still put a hand-written dict into ``data`` (file:function → the event types
# they build). Convert them to their payload model and drop them from here; never add one.
HAND_BUILT: dict[str, set[str]] = {}


@dataclass
class Site:
    """One event built in the code, and what is known statically about its ``data``."""

    where: str  # path:function
    line: int
    type: str | None  # the event type, when written as EventType.X
    keys: set[str] = field(default_factory=set)  # keys of dict literals put into data
    hand_built: bool = False
    model: str | None = None  # the payload model dumped into data, when it can be seen

    def __str__(self) -> str:
        return f"{self.where} (line {self.line})"


def _assigned(function: ast.AST, name: str, before: int) -> ast.expr | None:
    """The value last assigned to ``name`` in the function before the given line."""
    found: ast.expr | None = None
    for node in ast.walk(function):
        if getattr(node, "lineno", before) >= before:
            continue
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            if found is None or node.lineno > getattr(found, "lineno", 0):
                found = node.value
        elif (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == name
            and node.value is not None
            and (found is None or node.lineno > getattr(found, "lineno", 0))
        ):
            found = node.value
    return found


def _read_data(site: Site, function: ast.AST, expr: ast.expr | None, line: int) -> None:
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and _is_payload(expr.func.id):
        site.model = expr.func.id
    elif isinstance(expr, ast.Dict):
        site.hand_built = True
        for key in expr.keys:
            assert isinstance(key, ast.Constant) and isinstance(key.value, str), site
            site.keys.add(key.value)
    elif isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.BitOr):
        _read_data(site, function, expr.left, line)
        _read_data(site, function, expr.right, line)
    elif isinstance(expr, ast.Name):
        _read_data(site, function, _assigned(function, expr.id, line), line)
    elif (
        isinstance(expr, ast.Call)
        and isinstance(expr.func, ast.Attribute)
        and expr.func.attr == "model_dump"
    ):
        built = expr.func.value
        if isinstance(built, ast.Name):
            built = _assigned(function, built.id, line) or built
        _read_data(site, function, built, line)


def _argument(call: ast.Call, position: int | None, keyword: str) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value
    if position is not None and len(call.args) > position:
        return call.args[position]
    return None


def _is_payload(name: str) -> bool:
    model = getattr(schemas.events, name, None)
    return isinstance(model, type) and issubclass(model, BaseModel) and model is not Envelope


def _event_type(expr: ast.expr | None) -> str | None:
    if (
        isinstance(expr, ast.Attribute)
        and isinstance(expr.value, ast.Name)
        and expr.value.id == "EventType"
    ):
        return str(EventType[expr.attr])
    return None


def _site(
    path: str, function: ast.FunctionDef | ast.AsyncFunctionDef, call: ast.Call
) -> Site | None:
    """The event a call builds: a builder, or any helper given an ``EventType.X`` and data."""
    name = call.func.id if isinstance(call.func, ast.Name) else ast.unparse(call.func)
    builder = name.rsplit(".", 1)[-1] in BUILDERS
    kind = _argument(call, None if name == "Envelope" else 0, "type")
    site = Site(f"{path}:{function.name}", call.lineno, _event_type(kind))
    if not builder and site.type is None:
        return None
    if builder:
        candidates = [_argument(call, 1 if name.endswith("caused") else None, "data")]
    else:  # a helper such as conv.event(EventType.X, key, data, now): look at every argument
        candidates = [*call.args[1:], *(kw.value for kw in call.keywords)]
    for expr in candidates:
        _read_data(site, function, expr, call.lineno)
    return site if builder or site.model or site.keys else None


def sites() -> Iterator[Site]:
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            path = file.relative_to(ROOT).as_posix()
            tree = ast.parse(file.read_text(), path)
            for function in ast.walk(tree):
                if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                inner = {
                    id(n)
                    for f in ast.walk(function)
                    if f is not function and isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                    for n in ast.walk(f)
                }
                for call in ast.walk(function):
                    if isinstance(call, ast.Call) and id(call) not in inner:
                        site = _site(path, function, call)
                        if site is not None:
                            yield site


def _fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_events_are_found_where_the_code_builds_them() -> None:
    found = list(sites())
    assert len(found) >= 20, [str(s) for s in found]
    assert any(s.type == EventType.CONVERSATION_ASSIGNED for s in found)


def test_no_new_event_payload_is_a_hand_written_dict() -> None:
    hand_built = {s.where for s in sites() if s.hand_built}
    assert hand_built <= set(HAND_BUILT), (
        "build data with its schemas.events model: "
        f"Model(...).model_dump(mode='json'), not a dict: {sorted(hand_built - set(HAND_BUILT))}"
    )


def test_every_key_put_into_data_is_a_field_of_its_model() -> None:
    for site in sites():
        if not site.keys:
            continue
        types = {site.type} if site.type else HAND_BUILT.get(site.where, set())
        assert types, f"{site}: cannot tell which event it builds; add it to HAND_BUILT"
        for kind in types:
            missing = site.keys - _fields(PAYLOADS[kind])
            assert not missing, f"{site} puts {missing} into {kind}: add them to its model"


def test_the_model_dumped_into_data_is_the_one_of_its_event_type() -> None:
    checked = 0
    for site in sites():
        if site.type is None or site.model is None:
            continue
        model = getattr(schemas.events, site.model)
        assert issubclass(PAYLOADS[site.type], model), f"{site}: {site.model} for {site.type}"
        checked += 1
    assert checked >= 10


def test_every_payload_model_is_its_own_named_schema() -> None:
    names = [model.__name__ for model in PAYLOADS.values()]
    assert len(set(names)) == len(names) == len(EventType)
