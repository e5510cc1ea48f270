"""Reading sink URLs: file paths the way SQLAlchemy reads them, and passwords kept out of messages."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit

from multillm.errors import ConfigError
from multillm.redact import scrub
from multillm.urls import mask_url

MEMORY: Final = ":memory:"


def split_scheme(url: str) -> tuple[str, str]:
    """The lower-cased scheme and what follows `://`.

    Raises:
        ConfigError: `url` has no `scheme://`.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        raise ConfigError(f"malformed sink URL {mask_url(url)!r}: expected SCHEME://...")
    return scheme.lower(), rest


def file_path(url: str, rest: str, *, memory_ok: bool) -> str:
    """The file of `scheme:///relative/path` (from the working folder) or `scheme:////absolute/path`.

    The path is made absolute now, so a later change of working folder does not move the file.

    Raises:
        ConfigError: the URL names a host, has a query, or has no path.
    """
    if memory_ok and rest in ("", "/" + MEMORY):
        return MEMORY
    if not rest.startswith("/"):
        raise ConfigError(
            f"malformed sink URL {mask_url(url)!r}: a file URL has no host; "
            "use SCHEME:///relative/path or SCHEME:////absolute/path"
        )
    path = rest[1:]
    if not path:
        raise ConfigError(f"malformed sink URL {mask_url(url)!r}: no file path")
    if "?" in path:
        raise ConfigError(f"malformed sink URL {mask_url(url)!r}: query parameters are not supported")
    return str(Path.cwd() / path)


def postgres_url(url: str, rest: str) -> str:
    """The libpq URL of a `postgresql://`, `postgres://` or `postgresql+psycopg://` URL.

    Raises:
        ConfigError: the URL cannot be parsed (e.g. a port that is not a number).
    """
    libpq = "postgresql://" + rest
    try:
        urlsplit(libpq).port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise ConfigError(f"malformed sink URL {mask_url(url)!r}: {mask_url(str(exc))}") from None
    return libpq


def cannot_open(url: str, exc: BaseException) -> str:
    """One line naming the sink (password masked) and why it could not be opened.

    The driver's text is joined onto one line (libpq's spans several) and any password of
    the URL is scrubbed from it, in case a driver quotes its connection string.
    """
    try:
        parts = urlsplit(url)
        passwords = [parts.password, *parse_qs(parts.query).get("password", [])]
        # parse_qs unquotes; a driver may quote the value as written in the URL, too.
        passwords += re.findall(r"(?:^|&)password=([^&]*)", parts.query)
    except ValueError:
        passwords = []
    secrets = [form for p in passwords if p for form in (p, unquote(p))]
    cause = " ".join(scrub(str(exc), secrets).split()) or type(exc).__name__
    return f"cannot open sink {mask_url(url)}: {cause}"
