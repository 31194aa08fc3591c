"""What one client may hold and do: connections in all, per peer address and per address
range, the modes it may name, its prompt's size before tokenizing, and the check of an
API key; and how a client's mistake is logged (one line, at info level). Both
endpoints (native_server, openai_api, through the service) use them, so one client
cannot lock out the others by opening every connection there is."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections import Counter

from configs.schema import LeapfrogConfig
from runtime.modes import SINGLE_WORKER_LOSSLESS_MODES, check_mode

log = logging.getLogger("leapfrog.serve")


class ConnectionLimits:
    """Counts open connections, in all, per peer address (IP, port left out) and per address
    range (address_range): one who holds many addresses of a range (a host's IPv6 prefix,
    a subnet) still cannot take every connection there is."""

    def __init__(self, total: int, per_peer: int, per_range: int | None = None):
        self.total, self.per_peer = total, per_peer
        self.per_range = per_range if per_range is not None else total
        self.open: Counter[str] = Counter()
        self.open_in_range: Counter[str] = Counter()

    def admit(self, peer: str) -> str | None:
        """Count the connection in and return None, or return why it is refused (not counted)."""
        where = address_range(peer)
        if sum(self.open.values()) >= self.total:
            return f"the server holds its limit of {self.total} connections; try again later"
        if self.open[peer] >= self.per_peer:
            return f"your address holds its limit of {self.per_peer} connections; close one first"
        if self.open_in_range[where] >= self.per_range:
            return f"your address range {where} holds its limit of {self.per_range} connections; try again later"
        self.open[peer] += 1
        self.open_in_range[where] += 1
        return None

    def release(self, peer: str) -> None:
        for counter, key in ((self.open, peer), (self.open_in_range, address_range(peer))):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]


RANGE_PREFIX = {4: 24, 6: 48}  # an IPv4 /24 (a subnet), an IPv6 /48 (what one site is given)


def address_range(peer: str) -> str:
    """The range a peer address belongs to ("203.0.113.0/24", "2001:db8:1::/48"); an IPv4
    address mapped into IPv6 counts as IPv4; anything not an IP address is its own range."""
    try:
        ip = ipaddress.ip_address(peer.split("%")[0])  # an IPv6 zone ("%eth0") is no part of the address
    except ValueError:
        return peer
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ipaddress.ip_network(f"{ip}/{RANGE_PREFIX[ip.version]}", strict=False))


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


def log_client_mistake(endpoint: str, peer: str, reason: str) -> None:
    """One line at info level for what a client did wrong (a malformed message, a refused
    request, a deadline missed): no traceback, so a server fault (logged with its traceback
    at error level) stands out from an attack or a broken client."""
    log.info("%s client %s: %s", endpoint, peer or "?", " ".join(reason.split())[:200])
