"""Whether a host is this machine's loopback: the settings' check of a plain-http iVvy URL, the
console's and the fake iVvy's refusal to listen beyond it. A module of its own, without the
process toolkit's asyncio: the settings, which every command reads, need only this."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine's loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
