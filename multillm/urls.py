"""URL helpers that keep passwords out of messages."""

from __future__ import annotations

import re
from typing import Final

_QUERY_PASSWORD: Final = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """`url` with any password replaced by `***`, for error messages and logs.

    Errs on the side of hiding: everything between the user name and the last
    `@` is masked, so a password with an unescaped `/` or `@` is hidden too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        # Malformed (no scheme): a `user:password@host` may still be in there.
        scheme, rest = "", url
    if "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        if colon:
            rest = f"{user}:***@{host}"
    return _QUERY_PASSWORD.sub(r"\1***", scheme + sep + rest)


__all__ = ["mask_url"]
