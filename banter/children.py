"""Child processes that end with the process that started them.

``banter up`` starts Redis, a worker and the producer; killed outright (SIGKILL, the OOM
killer), it runs no cleanup, and its children would live on orphaned: the producer holding
the port, Redis writing the data directory a new ``banter up`` then starts another Redis on.
On Linux each child asks the kernel for a signal when its parent dies (``PR_SET_PDEATHSIG``):
Redis and the producer SIGTERM, and shut down as on Ctrl-C; the worker SIGKILL, as its Redis
goes at the same moment and a warm shutdown would wait for ever on jobs it can no longer
publish (they are taken over, as after any crash, once their leases lapse). Elsewhere nothing
is asked (the lock a private Redis holds on its directory still keeps a second one out).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Callable

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when the process
    calling this dies (None where the platform cannot ask for it)."""
    if _LIBC is None:
        return None
    parent = os.getpid()

    def ask() -> None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before the request was made
            os.kill(os.getpid(), sig)

    return ask
