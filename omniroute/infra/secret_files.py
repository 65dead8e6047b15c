"""Secrets read from files: Docker and Kubernetes mount each secret as a file, rotated in place.

Only the file's path ever appears in an error, never a byte of what it holds. A file is read
whole, bounded (a path pointing at a device or a log must not hang or swamp a reload), as
UTF-8, with one trailing newline ignored (``echo token > file`` and editors add one).

Only a regular file is read. It is opened non-blocking, so a FIFO without a writer (or a
device) cannot hang the process in ``open()``, then checked with ``fstat``: anything else is
refused by name. Symbolic links are followed on purpose: Kubernetes mounts a secret as
``<name> -> ..data/<name>`` and rotates it by swapping the ``..data`` link.

A path in an error hides what may be a secret pasted by mistake into a ``*_file`` field
(``auth_token_file: <the token>``): see :func:`shown_path`.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from pydantic import SecretStr

MAX_SECRET_BYTES = 64 * 1024
# A path component that does not exist is printed only when it reads as a file name.
_NAME = re.compile(r"[a-z0-9._-]{1,24}")
_SEPARATORS = frozenset("._-")


def _reads_as_a_name(component: str) -> bool:
    return bool(_NAME.fullmatch(component)) and (
        len(component) <= 12 or any(c in _SEPARATORS for c in component)
    )


def shown_path(path: Path) -> str:
    """``path`` as an error may print it.

    The part of the path that exists on disk is printed as it is (directories and files that
    exist are not secrets). The rest may be a secret pasted into a ``*_file`` field, so it
    is printed only when each of its components reads as a file name: at most 24 characters
    of lowercase letters, digits, ``.``, ``_`` and ``-``, and either at most 12 characters
    or holding one of ``.``, ``_``, ``-``. Otherwise (mixed case, longer, a long run without
    a separator, ``+`` or ``=``: what generated tokens look like) the whole rest is printed
    as ``…(N chars)``, so a token that contains a ``/`` leaks none of its pieces either.
    The error also names the configuration's line and field, where the operator reads the
    value as written. (A short lowercase secret reads as a name: the rule cannot tell.)
    """
    parts = path.parts
    existing = len(parts)
    while existing > 0 and not os.path.lexists(Path(*parts[:existing])):
        existing -= 1
    if existing == len(parts):
        return str(path)
    missing = os.path.join(*parts[existing:])
    if not all(_reads_as_a_name(part) for part in parts[existing:]):
        missing = f"…({len(missing)} chars)"
    return missing if existing == 0 else os.path.join(Path(*parts[:existing]), missing)


class SecretFileError(Exception):
    """A secret file that cannot be used; the message names the path, never the content.

    ``absent`` is true when there is no secret at all (no such file, or an empty one): what a
    build machine's ``config check --no-secrets`` tolerates, unlike a file that is malformed.
    """

    def __init__(self, message: str, *, absent: bool = False) -> None:
        super().__init__(message)
        self.absent = absent


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _read_bounded(path: Path) -> bytes:
    """Up to MAX_SECRET_BYTES + 1 bytes of the regular file at ``path`` (links followed)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SecretFileError(
                f"secret file {shown_path(path)} is {_kind(mode)}, not a regular file"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_SECRET_BYTES:
            chunk = os.read(fd, MAX_SECRET_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_secret(path: Path) -> str:
    """The secret in ``path``, less one trailing newline. Raises SecretFileError."""
    try:
        data = _read_bounded(path)
    except FileNotFoundError:
        raise SecretFileError(
            f"secret file {shown_path(path)} does not exist", absent=True
        ) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SecretFileError(f"cannot read secret file {shown_path(path)}: {reason}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise SecretFileError(f"secret file {path} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretFileError(f"secret file {path} is not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-1].removesuffix("\r")
    if not text:
        raise SecretFileError(f"secret file {path} is empty", absent=True)
    return text


def parse_keys(text: str, path: Path) -> dict[str, SecretStr]:
    """``key_id=secret`` lines → keys. Blank lines and ``#`` comments are skipped; spaces
    around the ``=`` and at the ends of a line are ignored. Raises SecretFileError naming the
    line number (a malformed line may be a bare secret, so it is never quoted)."""
    keys: dict[str, SecretStr] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key_id, equals, secret = (part.strip() for part in stripped.partition("="))
        if not equals or not key_id or not secret or any(c.isspace() for c in key_id):
            raise SecretFileError(f"secret file {path}, line {number}: expected key_id=secret")
        if key_id in keys:
            raise SecretFileError(f"secret file {path}, line {number}: key {key_id} given twice")
        keys[key_id] = SecretStr(secret)
    if not keys:
        raise SecretFileError(f"secret file {path} has no key_id=secret line", absent=True)
    return keys
