"""What one client may hold and do: connections in all and per peer address, the modes it
may name, its prompt's size before tokenizing, and the check of an API key. Both
endpoints (native_server, openai_api, through the service) use them, so one client
cannot lock out the others by opening every connection there is."""

from __future__ import annotations

import hmac
import ipaddress
from collections import Counter

from configs.schema import LeapfrogConfig
from runtime.modes import SINGLE_WORKER_LOSSLESS_MODES, check_mode


class ConnectionLimits:
    """Counts open connections, in all and per peer address (IP, port left out)."""

    def __init__(self, total: int, per_peer: int):
        self.total, self.per_peer = total, per_peer
        self.open: Counter[str] = Counter()

    def admit(self, peer: str) -> str | None:
        """Count the connection in and return None, or return why it is refused (not counted)."""
        if sum(self.open.values()) >= self.total:
            return f"the server holds its limit of {self.total} connections; try again later"
        if self.open[peer] >= self.per_peer:
            return f"your address holds its limit of {self.per_peer} connections; close one first"
        self.open[peer] += 1
        return None

    def release(self, peer: str) -> None:
        self.open[peer] -= 1
        if self.open[peer] <= 0:
            del self.open[peer]


def peer_address(peername) -> str:
    """The address part of a socket's peername (("1.2.3.4", port) or a v6 tuple); "" if unknown."""
    return str(peername[0]) if isinstance(peername, tuple) and peername else ""


def key_matches(expected: str, given: str | None) -> bool:
    """True when no key is required, or `given` is it (compared in constant time)."""
    if not expected:
        return True
    return given is not None and hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def allowed_modes(config: LeapfrogConfig) -> frozenset[str]:
    """The modes requests may name: [server] allowed_modes, or by default the server's own
    mode and the single-worker lossless ones. Every name must be a mode."""
    names = config.server.allowed_modes or [config.generation.mode, *SINGLE_WORKER_LOSSLESS_MODES]
    for name in names:
        check_mode(name)
    return frozenset(names)


def prompt_bytes(prompt: str | list[dict]) -> int:
    """A prompt's size in UTF-8 bytes (a chat's contents summed): cheap, known before tokenizing."""
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    return sum(len(t.encode("utf-8")) for t in texts)
