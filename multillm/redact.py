"""Keeping api keys out of everything we write: logs, records, replies, dead letters."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

_API_KEY_FIELD: Final = re.compile(rb'("api_?[kK]ey"\s*:\s*)"(?:[^"\\]|\\.)*"')
MASK: Final = "***"


def redact_body(body: bytes) -> bytes:
    """Mask every `apiKey` value in a JSON body, even one too broken to decode."""
    return _API_KEY_FIELD.sub(rb'\1"' + MASK.encode() + rb'"', body)


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """Replace each secret that occurs in `text` (a provider's error, an exception) by a mask."""
    for secret in secrets:
        if secret:
            # Also the escaped form, as a repr() or a bytes literal in an exception would show it.
            for form in {secret, repr(secret)[1:-1], repr(secret.encode(errors="replace"))[2:-1]}:
                text = text.replace(form, MASK)
    return text
