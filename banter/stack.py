"""``banter up``: the whole stack on embedded defaults, in one terminal.

Starts a private redis-server when ``BANTER_REDIS_URL`` is not set, builds and promotes the
demo models when the registry is empty, then runs one CPU worker and the producer as child
processes until Ctrl-C (or until one of them dies), and stops everything it started.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

import requests

from banter.children import die_with_parent
from banter.demo import DEMO_EMBED, DEMO_GPT, build_demo
from banter.errors import BanterError, Unavailable
from banter.netaddr import host_port
from banter.redisconn import connect, shown_url
from banter.redisserver import RedisServer
from banter.settings import Settings, SettingsError
from producer.auth import KeyRing
from registry.service import Registry


def ensure_demo_models(settings: Settings, registry: Registry) -> list[str]:
    """Build and promote the demo models the registry never held, unless it holds another
    model (a registry of one's own is left as it is). A first ``banter up`` stopped between
    its two promotes is finished by the next one; the build is deterministic, so the files of
    a demo model already promoted are written again byte for byte. Returns the names
    promoted."""
    names = {record.name for record in registry.history()}
    missing = [(name, kind) for name, kind in ((DEMO_GPT, "generate"), (DEMO_EMBED, "embed"))
               if name not in names]
    if not missing or names - {DEMO_GPT, DEMO_EMBED}:
        return []
    dirs = build_demo(settings.model_root)
    for name, kind in missing:
        registry.promote(name=name, kind=kind, path=str(dirs[name] / "model.onnx"),
                         actor="banter-up", reason="demo model built by banter up")
    return [name for name, _ in missing]


def wait_ready(url: str, children: list[subprocess.Popen], timeout_s: float = 90.0) -> None:
    """Until ``/readyz`` answers 200; Unavailable when a child (``children``: the worker, the
    producer) exits first, saying which and how."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, child in zip(("worker", "producer"), children):
            code = child.poll()
            if code is not None:
                raise Unavailable(f"the {name} {_how(code)} during start-up; its log above "
                                  "says why")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise Unavailable(f"the stack was not ready within {timeout_s:.0f}s")


def sample_key(settings: Settings, env: dict[str, str]) -> str:
    """The key the sample jobs send: ``BANTER_API_KEY`` (the client's), else the first key of
    BANTER_API_KEYS or BANTER_ADMIN_KEYS; empty when authentication is off. SettingsError when
    authentication is on and neither holds a key in clear (only digests, or only a keys file)."""
    keys = [k.strip() for k in f"{settings.api_keys},{settings.admin_keys}".split(",")
            if k.strip() and not k.strip().startswith("sha256:")]
    key = env.get("BANTER_API_KEY") or (keys[0] if keys else "")
    if not key and not settings.auth_disabled and has_keys(settings):
        raise SettingsError("the sample jobs need an API key and the configured keys are in a "
                            "keys file or given as digests: set BANTER_API_KEY to one of them")
    return key


def has_keys(settings: Settings) -> bool:
    return bool(settings.api_keys or settings.admin_keys or settings.keys_file)


def check_before_start(settings: Settings) -> None:
    """What would stop the stack part way, found before anything starts: the producer's keys
    (SettingsError, exit 2) and, when one is configured, Redis (a redis error, exit 3)."""
    if has_keys(settings):
        KeyRing.from_settings(settings)
    if "BANTER_REDIS_URL" in os.environ:
        connect(settings.redis_url).ping()


def sample_jobs(url: str, api_key: str) -> None:
    """Send one generate and one embed job through the stack and print what came back."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    answer = requests.post(f"{url}/v1/inference", json={"prompt": "Say something.",
                                                        "max_tokens": 18},
                           headers=headers, timeout=120)
    _check_sample(answer)
    body = answer.json()
    print(f"sample generate ({body['model']} v{body['version']}, {body['backend']}, "
          f"batch {answer.headers['X-Batch-Size']}, {answer.headers['X-Latency-MS']} ms):"
          f"\n  {body['text'].strip()}", flush=True)
    answer = requests.post(f"{url}/v1/embeddings", json={"input": "banterhearts"},
                           headers=headers, timeout=120)
    _check_sample(answer)
    vector = answer.json()["data"][0]["embedding"]
    print(f"sample embed ({answer.json()['model']}): {len(vector)} dims, first "
          f"{[round(x, 4) for x in vector[:4]]}", flush=True)


def _check_sample(answer: requests.Response) -> None:
    if answer.status_code in (401, 403):
        raise SettingsError(f"the sample job's key was refused ({answer.status_code}): set "
                            "BANTER_API_KEY to a key the stack accepts")
    if answer.status_code != 200:
        raise BanterError(f"the sample job failed ({answer.status_code}): {answer.text[:300]}")


MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0  # a worker failing faster than this is given up on


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def up(settings: Settings, host: str, port: int, sample: bool, exit_after_sample: bool) -> int:
    check_before_start(settings)
    key = sample_key(settings, dict(os.environ)) if sample else ""  # refused here, not later
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the stack like Ctrl-C
    env = dict(os.environ)
    redis_server = None
    redis_shown = shown_url(settings.redis_url)
    if "BANTER_REDIS_URL" not in env:
        redis_server = RedisServer(settings.home / "redis", persist=True,
                                   password=secrets.token_urlsafe(24))
        env["BANTER_REDIS_URL"] = redis_server.start()
        settings = Settings.from_env(env)
        redis_shown = (f"{shown_url(redis_server.url)} (private; for other banter "
                       f"commands: BANTER_REDIS_URL=\"$(cat {redis_server.url_file})\")")
    env.update({"BANTER_HOME": str(settings.home), "BANTER_MODEL_ROOT": str(settings.model_root),
                "BANTER_REGISTRY_PATH": str(settings.registry_path)})
    if not has_keys(settings):
        env["BANTER_AUTH_DISABLED"] = "true"
        print("WARNING: no BANTER_API_KEYS, BANTER_ADMIN_KEYS or BANTER_KEYS_FILE set: "
              "authentication is OFF (BANTER_AUTH_DISABLED=true for this stack): anyone who can "
              f"reach {host_port(host, port)} can run jobs and change the registry; bind only "
              "to a trusted interface", file=sys.stderr, flush=True)
    children: list[subprocess.Popen] = []
    try:
        built = ensure_demo_models(settings, Registry.from_settings(settings,
                                                                    connect(settings.redis_url)))
        cli = [sys.executable, "-m", "banter.cli"]
        worker = [*cli, "worker", "--cpu"]
        children.append(subprocess.Popen(worker, env=env, preexec_fn=worker_dies_with_up()))
        children.append(subprocess.Popen([*cli, "producer", "--host", host, "--port", str(port)],
                                         env=env, preexec_fn=die_with_parent()))
        url = f"http://{host_port(host, port)}"
        wait_ready(url, children)
        print(f"banterhearts is up\n  API      {url}\n  Redis    {redis_shown}"
              f"\n  models   {settings.model_root}"
              f"{' (demo models built)' if built else ''}\n  registry {settings.registry_path}"
              + ("" if exit_after_sample else "\nCtrl-C stops everything."), flush=True)
        if sample:
            sample_jobs(url, key)
        if exit_after_sample:
            return 0
        return supervise(children, worker, env, redis_server)
    except KeyboardInterrupt:
        return 0
    finally:
        # a second Ctrl-C (or SIGTERM) while the stack stops must not cut this short: the
        # children get the terminal's Ctrl-C themselves, and the private Redis and its URL
        # file go last
        handlers = {sig: signal.signal(sig, signal.SIG_IGN)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            stop_all(children)
            if redis_server:
                redis_server.stop()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def worker_dies_with_up():
    """The worker's ``preexec_fn``: SIGKILL when ``banter up`` dies (``banter.children``)."""
    return die_with_parent(signal.SIGKILL)


def supervise(children: list[subprocess.Popen], worker: list[str], env: dict[str, str],
              redis_server: RedisServer | None = None) -> int:
    """Until a child exits for good: a worker that exits (a crash, the OOM killer, an engine
    death's code 70) is started again, as its supervisor would, unless it did so
    ``MAX_RESTARTS`` times in ``RESTART_WINDOW_S``; the producer or the private Redis exiting
    stops the stack. Says which exited and how. Returns 1 (``children[0]`` is the worker)."""
    restarts: list[float] = []
    while True:
        time.sleep(0.5)
        if redis_server is not None and redis_server.process is not None:
            code = redis_server.process.poll()
            if code is not None:
                log_file = redis_server.directory / "redis.log"
                print(f"banter up: its Redis {_how(code)} (log in {log_file}); stopping the "
                      "stack", file=sys.stderr, flush=True)
                return 1
        for index, child in enumerate(children):
            code = child.poll()
            if code is None:
                continue
            name = "worker" if index == 0 else "producer"
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW_S]
            if name == "worker" and len(restarts) < MAX_RESTARTS:
                restarts.append(now)
                print(f"banter up: the worker {_how(code)}; starting it again", file=sys.stderr,
                      flush=True)
                children[0] = subprocess.Popen(worker, env=env,
                                               preexec_fn=worker_dies_with_up())
                continue
            again = f" ({MAX_RESTARTS} times in {RESTART_WINDOW_S:g} s)" if name == "worker" else ""
            print(f"banter up: the {name} {_how(code)}{again}; stopping the stack",
                  file=sys.stderr, flush=True)
            return 1


def _how(code: int) -> str:
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def stop_all(children: list[subprocess.Popen], timeout_s: float = 15.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
