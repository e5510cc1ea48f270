"""Keeping api keys out of everything we write: logs, records, replies, dead letters."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import msgspec

_STRING: Final = rb'"(?:[^"\\]|\\.)*"'
# A JSON string, a colon and a string value (or one cut off by the end of a broken
# body): a member whose value may be a key.
_MEMBER: Final = re.compile(b"(" + _STRING + rb')(\s*:\s*)"(?:[^"\\]|\\.)*"?')
_KEY_NAMES: Final = {"apikey", "api_key"}
MASK: Final = "***"


def redact_body(body: bytes) -> bytes:
    """Mask every `apiKey` value in a JSON body, even one too broken to decode.

    The member name is compared unescaped, as a JSON decoder reads it: `"api\\u004bey"`
    is `apiKey` too.
    """

    def mask(member: re.Match[bytes]) -> bytes:
        try:
            name = msgspec.json.decode(member.group(1), type=str)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            return member.group(0)
        if name.lower() not in _KEY_NAMES:
            return member.group(0)
        return member.group(1) + member.group(2) + b'"' + MASK.encode() + b'"'

    return _MEMBER.sub(mask, body)


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """Replace each secret that occurs in `text` (a provider's error, an exception) by a mask."""
    for secret in secrets:
        if secret:
            # Also the escaped form, as a repr() or a bytes literal in an exception would show it.
            for form in {secret, repr(secret)[1:-1], repr(secret.encode(errors="replace"))[2:-1]}:
                text = text.replace(form, MASK)
    return text
