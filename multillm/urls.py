"""URL helpers: broker node lists, and passwords kept out of messages."""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

from multillm.errors import ConfigError

_QUERY_PASSWORD: Final = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)
# Where a broker URL lists the nodes of one cluster: kombu's failover form.
NODE_SEPARATOR: Final = ";"
_AMQP_SCHEMES: Final = ("amqp", "amqps")


def mask_url(url: str) -> str:
    """`url` with any password replaced by `***`, for error messages and logs; each node of a
    `;`-separated list on its own.

    Errs on the side of hiding: everything between the user name and the last
    `@` is masked, so a password with an unescaped `/` or `@` is hidden too.
    """
    if NODE_SEPARATOR in url:
        return NODE_SEPARATOR.join(mask_url(node) for node in url.split(NODE_SEPARATOR))
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


def broker_nodes(broker_url: str) -> list[str]:
    """The node URLs of `broker_url`: one AMQP URL, or the nodes of one cluster joined by `;`.

    Raises:
        ConfigError: an entry is empty or not an AMQP URL with a host (named, its password masked).
    """
    nodes = broker_url.split(NODE_SEPARATOR)
    for position, node in enumerate(nodes, 1):
        if problem := _node_problem(node.strip()):
            where = f"entry {position} of {len(nodes)}" if len(nodes) > 1 else "the broker URL"
            raise ConfigError(f"{where} ({mask_url(node)!r}) {problem}")
    return [node.strip() for node in nodes]


def _node_problem(node: str) -> str | None:
    if not node:
        return "is empty"
    try:
        parts = urlsplit(node)
        port = parts.port  # raises for a port that is not a number in range
    except ValueError:  # its message may quote part of the password
        return "is not a URL (a port that is not a number from 0 to 65535?)"
    if parts.scheme not in _AMQP_SCHEMES:
        return f"must start with amqp:// or amqps://, not {parts.scheme + '://' if parts.scheme else 'nothing'}"
    if not parts.hostname:
        return "names no host"
    if port == 0:
        return "has port 0"
    return None


__all__ = ["NODE_SEPARATOR", "broker_nodes", "mask_url"]
