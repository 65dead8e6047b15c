"""Secrets read from files: Docker and Kubernetes mount each secret as a file, rotated in place.

Only the file's path ever appears in an error, never a byte of what it holds. A file is read
whole, bounded (a path pointing at a device or a log must not hang or swamp a reload), as
UTF-8, with one trailing newline ignored (``echo token > file`` and editors add one).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

MAX_SECRET_BYTES = 64 * 1024


class SecretFileError(Exception):
    """A secret file that cannot be used; the message names the path, never the content.

    ``absent`` is true when there is no secret at all (no such file, or an empty one): what a
    build machine's ``config check --no-secrets`` tolerates, unlike a file that is malformed.
    """

    def __init__(self, message: str, *, absent: bool = False) -> None:
        super().__init__(message)
        self.absent = absent


def read_secret(path: Path) -> str:
    """The secret in ``path``, less one trailing newline. Raises SecretFileError."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        raise SecretFileError(f"secret file {path} does not exist", absent=True) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SecretFileError(f"cannot read secret file {path}: {reason}") from None
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
