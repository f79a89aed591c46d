"""A listening address as text: ``host:port``, an IPv6 address in brackets (``[::1]:8000``), as
gunicorn's bind and a URL's authority take it."""

from __future__ import annotations


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bare_host(raw: str) -> str:
    """``--host``/``--address`` as the socket calls take it: ``[::1]`` is ``::1``."""
    return raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
