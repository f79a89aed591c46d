"""Whether the client of a request has closed its connection, asked while its synchronous
call waits on a job (no byte is written until the answer, so a write cannot tell).

The request's socket (``gunicorn.socket``, or ``werkzeug.socket`` under the development
server) is polled for ``POLLRDHUP``: the peer closed or shut down its sending side, as a client
does when it gives up (an SDK's timeout before its retry, Ctrl-C). Bytes the client sends
meanwhile are not read and do not count. Where the platform has no ``POLLRDHUP`` (not Linux), a
client's leaving goes unnoticed and its job runs to the end, as it did before.
"""

from __future__ import annotations

import select
from typing import Any, Callable

_RDHUP = getattr(select, "POLLRDHUP", 0)


def watch(environ: dict[str, Any]) -> Callable[[], bool]:
    """A check, callable from any thread while the request is in hand, from several at once
    (``/v1/inference/batch`` waits on each job in a thread): has its client left?"""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if sock is None or not _RDHUP:
        return lambda: False
    fd = sock.fileno()

    def gone() -> bool:
        poller = select.poll()  # one per call: a poll object refuses concurrent poll()s
        poller.register(fd, _RDHUP)  # POLLHUP and POLLERR are always reported
        return bool(poller.poll(0))

    return gone
