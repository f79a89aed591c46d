"""A private RabbitMQ node for the tests: its own ports, data and logs in a temporary directory,
no plugins; stopped (with its Erlang VM) at the end. Never the machine's own node."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from kombu import Connection

from banter.redisserver import free_port

# Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user, who cannot write the
# test's directory; the script behind it runs the node as the current user.
CANDIDATES = ("/usr/lib/rabbitmq/bin/rabbitmq-server",)
START_TIMEOUT_S = 90


def find_server() -> str | None:
    for path in CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("rabbitmq-server")


class RabbitNode:
    """``tls``: (certificate, key) for a TLS listener too, at ``tls_url`` (amqps://)."""

    def __init__(self, directory: Path, tls: tuple[Path, Path] | None = None) -> None:
        self.directory = Path(directory)
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.tls = tls
        self.tls_port = free_port() if tls else 0
        self.tls_url = f"amqps://guest:guest@127.0.0.1:{self.tls_port}//" if tls else ""
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        server = find_server()
        if server is None:
            raise RuntimeError("no rabbitmq-server on this machine")
        for sub in ("mnesia", "log"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        (self.directory / "enabled_plugins").write_text("[].\n")
        config = "loopback_users = none\n"
        if self.tls:
            cert, key = self.tls
            config += (f"listeners.ssl.default = {self.tls_port}\n"
                       f"ssl_options.cacertfile = {cert}\nssl_options.certfile = {cert}\n"
                       f"ssl_options.keyfile = {key}\nssl_options.verify = verify_none\n"
                       "ssl_options.fail_if_no_peer_cert = false\n")
        (self.directory / "rabbitmq.conf").write_text(config)
        env = {**os.environ,
               "RABBITMQ_NODENAME": f"banter-test-{self.port}@localhost",
               "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(free_port()),
               "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
               "RABBITMQ_LOG_BASE": str(self.directory / "log"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
               "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
               "RABBITMQ_PID_FILE": str(self.directory / "pid")}
        with open(self.directory / "server.log", "wb") as log:
            self.process = subprocess.Popen([server], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited:\n{self.log_tail()}")
            try:
                with Connection(self.url, connect_timeout=1) as conn:
                    conn.ensure_connection(max_retries=1)
                return self.url
            except Exception:  # kombu and amqp raise several kinds while the node boots
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"rabbitmq-server did not accept connections:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return (self.directory / "server.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
