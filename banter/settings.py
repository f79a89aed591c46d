"""Settings: read once from ``BANTER_*`` environment variables into one frozen object.

Build it with ``Settings.from_env()`` at a process's entry point and pass it in; nothing else
reads the environment. Every field is documented in README.md (Settings).
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping
from urllib.parse import parse_qsl, urlencode, urlparse, urlsplit, urlunsplit

import redis

from banter import redisconn
from banter.errors import InvalidRequest
from registry.records import parse_ref

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
OPENAI_QUEUE_SUFFIX = ".openai"  # a lane's queue for the openai backend: "<lane queue>.openai"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # BANTER_LOG_LEVEL, any case
ADMISSIONS = ("continuous", "static")  # BANTER_ADMISSION and EngineSettings.admission
PREFILL_OVERLAPS = ("off", "on", "auto")  # BANTER_PREFILL_OVERLAP and EngineSettings.prefill_overlap
PREFILL_MERGES = ("off", "on", "auto")  # BANTER_PREFILL_MERGE and EngineSettings.prefill_merge
KV_LAYOUTS = ("auto", "inplace", "concat")  # BANTER_KV_LAYOUT and RunnerCache's kv_layout
# float settings that must be more than 0 (_float lets 0 through)
_POSITIVE = ("worker_heartbeat_s", "sync_timeout_s", "client_timeout_s", "openai_timeout_s")
# int settings that may be 0
_ZERO_ALLOWED = ("max_queue_depth", "openai_max_retries", "rate_limit_per_min", "bulk_concurrency",
                 "publish_ahead_steps", "max_waits_per_key", "ort_threads")


AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")  # RabbitMQ as the Celery broker
REDIS_SCHEMES = ("redis", "rediss", "unix")
# kombu's Redis transport takes no unix:// URL: the broker reaches Redis over TCP
BROKER_SCHEMES = ("redis", "rediss", *AMQP_SCHEMES)


class SettingsError(InvalidRequest):
    type = "invalid_setting"


_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
_AMQP_TLS_FILES = {"ssl_ca_certs": "ca_certs", "ssl_certfile": "certfile",
                   "ssl_keyfile": "keyfile"}


def amqp_tls(url: str) -> tuple[str, dict[str, object] | None]:
    """A RabbitMQ URL as py-amqp takes it: the URL without its ``ssl_*`` query options
    (redis-py's names, as ``rediss://`` takes them), and for ``amqps://`` its TLS options
    (Celery's ``broker_use_ssl``): the server's certificate and host name checked, against
    ``ssl_ca_certs`` or else the system's CAs, unless ``ssl_cert_reqs=none`` (or
    ``optional``); ``ssl_certfile`` and ``ssl_keyfile``: a client certificate. ValueError for
    another ``ssl_*`` option or value, or one on ``amqp://``. Another URL: as it is, None."""
    parts = urlsplit(url)
    if parts.scheme not in AMQP_SCHEMES:
        return url, None
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = {key: value for key, value in query if key.startswith("ssl_")}
    if parts.scheme != "amqps":
        if given:
            raise ValueError(f"{', '.join(given)}: TLS options are for an amqps:// URL")
        return url, None
    unknown = set(given) - {*_AMQP_TLS_FILES, "ssl_cert_reqs"}
    if unknown:
        raise ValueError(f"unknown TLS option {sorted(unknown)[0]!r}: amqps:// takes "
                         "ssl_ca_certs, ssl_certfile, ssl_keyfile and ssl_cert_reqs")
    reqs = given.get("ssl_cert_reqs", "required").lower()
    if reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be required, optional or none, got {reqs!r}")
    options: dict[str, object] = {"cert_reqs": _CERT_REQS[reqs]}
    if reqs != "none":
        options["server_hostname"] = parts.hostname
    options |= {_AMQP_TLS_FILES[key]: value for key, value in given.items()
                if key in _AMQP_TLS_FILES}
    rest = urlencode([(key, value) for key, value in query if not key.startswith("ssl_")])
    return urlunsplit(parts._replace(query=rest)), options


def _check_url(name: str, url: str, schemes: tuple[str, ...]) -> None:
    """SettingsError unless ``url`` parses, with one of ``schemes``, a port in range and (Redis)
    a numeric database. The message shows the URL with its password masked."""
    try:
        parts = urlparse(url)
        _ = parts.port  # raises for a port out of range
    except ValueError as exc:
        raise SettingsError(f"{name} is not a valid URL: {exc}") from None
    shown = url.replace(f":{parts.password}@", ":***@") if parts.password else url
    if parts.scheme not in schemes:
        kinds = "redis://, rediss:// or unix:// (Redis)"
        if schemes == BROKER_SCHEMES:
            kinds = "redis://, rediss:// (Redis; not unix://) or amqp:// (RabbitMQ)"
        raise SettingsError(f"{name}={shown!r}: expected a {kinds} URL")
    database = parts.path.strip("/") if parts.scheme in ("redis", "rediss") else ""
    if database and not (database.isascii() and database.isdigit()):
        raise SettingsError(f"{name}={shown!r}: the database after the host must be a number, "
                            f"got {database!r}")
    try:
        amqp_tls(url)
    except ValueError as exc:
        raise SettingsError(f"{name}={shown!r}: {exc}") from None
    if schemes == REDIS_SCHEMES:  # the state Redis (a broker URL's options are kombu's)
        try:  # a connection object, not connected: the URL's options (?socket_timeout=) apply
            redisconn.connect(url).connection_pool.make_connection()
        except (ValueError, TypeError, redis.RedisError) as exc:
            raise SettingsError(f"{name}={shown!r} has an option Redis clients cannot take: "
                                f"{exc}") from None


def _path(name: str, path: Path) -> Path:
    """``path`` with ``~`` expanded, absolute and resolved; SettingsError naming ``name`` when
    it cannot be (an unknown ``~user``, a symlink loop)."""
    try:
        return path.expanduser().resolve()
    except (RuntimeError, OSError) as exc:
        raise SettingsError(f"{name}={str(path)!r} cannot be used: {exc}") from None


def is_amqp(url: str) -> bool:
    """Whether a broker URL names RabbitMQ (else it is a Redis URL)."""
    return urlparse(url).scheme in AMQP_SCHEMES


def _check_directories(name: str, path: Path, directory: Path) -> None:
    """SettingsError naming ``name`` when ``directory`` (``path``'s own directory), or one
    above it, exists as something other than a directory: nothing could be made under it."""
    for part in (directory, *directory.parents):
        if part.exists() and not part.is_dir():
            raise SettingsError(f"{name}: {str(path)!r} cannot be used: {part} is a file, "
                                "not a directory")


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r}: expected true or false")


# the largest values a setting may take: past them a count no longer fits Redis or the OS (an
# EXPIRE, a stream length, a socket timeout) and fails at run time instead of at start
MAX_INT = 2**31 - 1
MAX_SECONDS = 1e8  # about three years: any duration, in seconds or milliseconds
MAX_RUNNING_LIMIT = 4096  # generate sequences in flight in one worker
MAX_WORKER_CONCURRENCY = 4096  # a worker's Celery threads (its prefetch: under AMQP's 65535)
MAX_ORT_THREADS = 1024  # BANTER_ORT_THREADS: each is a thread of every model's session


_INTEGER = re.compile(r"\s*[-+]?[0-9]+\s*")
_NUMBER = re.compile(r"\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*")


def parse_int(raw: str) -> int:
    """An integer in ASCII decimal digits (a sign and surrounding spaces allowed), where
    Python's ``int`` also takes ``1_000`` and other scripts' digits; ValueError otherwise."""
    if not _INTEGER.fullmatch(raw):
        raise ValueError(f"invalid integer {raw!r}")
    return int(raw)


def parse_number(raw: str) -> float:
    """A decimal number in ASCII (``1``, ``0.5``, ``1e3``), where Python's ``float`` also
    takes ``1_0``, ``inf``, ``nan`` and other scripts' digits; ValueError otherwise."""
    if not _NUMBER.fullmatch(raw):
        raise ValueError(f"invalid number {raw!r}")
    return float(raw)


def _int(name: str, raw: str, low: int = 0) -> int:
    try:
        value = parse_int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected an integer") from None
    if value < low:
        raise SettingsError(f"{name}={raw!r}: must be at least {low}")
    if value > MAX_INT:
        raise SettingsError(f"{name}={raw!r}: must be at most {MAX_INT}")
    return value


def _float(name: str, raw: str, positive: bool = False) -> float:
    try:
        value = parse_number(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number") from None
    low_ok = value > 0 if positive else value >= 0  # nan fails both
    if not (low_ok and value <= MAX_SECONDS):
        span = "more than 0 and at most" if positive else "a number from 0 to"
        raise SettingsError(f"{name}={raw!r}: must be {span} {MAX_SECONDS:.0e}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything configurable. The environment variable of field ``x`` is ``BANTER_X``
    (``openai_key`` also comes from ``OPENAI_API_KEY``; it is kept out of ``repr``)."""

    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str = ""  # empty: same as redis_url
    home: Path = Path(".banter")
    model_root: Path = Path()  # empty: home/models
    registry_path: Path = Path()  # empty: home/registry/history.jsonl
    queue_interactive: str = "interactive"
    queue_bulk: str = "bulk"
    inference_max_batch_size: int = 8
    embed_max_inputs: int = 2048  # texts one embed job (or /v1/embeddings request) may carry
    enable_batching: bool = True
    batch_window_ms: float = 5.0
    bulk_pass_ms: float = 25.0  # a pass with bulk embeds in it is kept about this short
    max_running: int = 32
    bulk_max_running: int = 4  # bulk generations started while interactive ones are active
    admission: str = "continuous"  # "static": batch-at-a-time generate baseline (benchmarks)
    publish_ahead_steps: int = 2  # generate steps the engine may run ahead of publishing their tokens
    prefill_overlap: str = "off"  # joining prompts' prefill beside the decode pass: off, on, auto
    prefill_merge: str = "auto"  # joining prompts in the decode pass: off, on, auto (a GPU's cache)
    kv_layout: str = "auto"  # generate KV cache: auto, inplace (workers/inplace.py) or concat
    cuda_tf32: bool = False  # TF32 float32 matrix products on the CUDA provider (ORT's use_tf32)
    ort_threads: int = 0  # ONNX Runtime intra-op threads of each of a worker's sessions; 0: ORT's default
    worker_concurrency: int = 64
    bulk_concurrency: int = 0  # bulk jobs a worker holds at once; 0: 3/4 of worker_concurrency
    bulk_yield_ms: float = 20.0  # bulk lane's pace while interactive jobs run (workers/lanes.py)
    worker_heartbeat_s: float = 5.0
    default_generate_model: str = "demo-gpt"
    default_embed_model: str = "demo-embed"
    default_max_tokens: int = 16
    max_tokens_limit: int = 512
    max_prompt_chars: int = 16000
    max_prompt_tokens: int = 512
    max_request_bytes: int = 1_048_576
    max_queue_depth: int = 10000
    job_ttl_s: int = 86400
    stream_maxlen: int = 10000
    sync_timeout_s: float = 120.0
    client_timeout_s: float = 30.0  # a client silent this long mid-request (or mid-read) is cut
    visibility_timeout_s: int = 60
    lease_ttl_s: int = 15
    log_level: str = "INFO"
    api_keys: str = field(default="", repr=False)  # comma-separated bearer keys (producer.auth)
    admin_keys: str = field(default="", repr=False)  # ... that may also use the registry admin API
    keys_file: str = ""  # file of keys, one "KEY", "user:KEY" or "admin:KEY" per line
    auth_disabled: bool = False  # true: no keys, every caller is admin (else keys are required)
    rate_limit_per_min: int = 0  # requests per API key per minute on /v1/; 0: no limit
    max_waits_per_key: int = 32  # streams and sync calls one key holds per producer process
    openai_key: str = field(default="", repr=False)  # never logged or stored
    openai_model: str = "gpt-4o-mini"  # upstream model of generate jobs that fall back
    openai_embed_model: str = "text-embedding-3-small"  # ... and of embed jobs
    openai_base_url: str = ""  # empty: the OpenAI API
    openai_max_tokens: int = 128  # cap on max_tokens sent upstream
    openai_timeout_s: float = 30.0  # per upstream request (and per wait for a streamed chunk)
    openai_max_retries: int = 4  # retries of 429, 5xx, timeouts and connection errors
    openai_concurrency: int = 16  # upstream requests in flight per worker process
    openai_fallback: bool = True  # serve through openai when no local model can

    def __post_init__(self) -> None:
        if self.home.exists() and not self.home.is_dir():
            raise SettingsError(f"BANTER_HOME={str(self.home)!r}: exists and is not a directory "
                                "(it holds the stack's Redis data, models and registry)")
        if self.admission not in ADMISSIONS:
            raise SettingsError(f"BANTER_ADMISSION={self.admission!r}: expected continuous "
                                "or static")
        if self.prefill_overlap not in PREFILL_OVERLAPS:
            raise SettingsError(f"BANTER_PREFILL_OVERLAP={self.prefill_overlap!r}: expected "
                                "off, on or auto")
        if self.prefill_merge not in PREFILL_MERGES:
            raise SettingsError(f"BANTER_PREFILL_MERGE={self.prefill_merge!r}: expected "
                                "off, on or auto")
        if self.kv_layout not in KV_LAYOUTS:
            raise SettingsError(f"BANTER_KV_LAYOUT={self.kv_layout!r}: expected auto, inplace "
                                "or concat")
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise SettingsError(f"BANTER_{name.upper()}={getattr(self, name)!r}: must be "
                                    "more than 0")
        if self.lease_ttl_s < 2 * self.worker_heartbeat_s:
            raise SettingsError(f"BANTER_LEASE_TTL_S={self.lease_ttl_s}: must be at least twice "
                                f"BANTER_WORKER_HEARTBEAT_S ({self.worker_heartbeat_s}), or a "
                                "lease lapses between two renewals and its job is taken over")
        for name in ("max_running", "bulk_max_running"):
            if getattr(self, name) > MAX_RUNNING_LIMIT:
                raise SettingsError(f"BANTER_{name.upper()}={getattr(self, name)}: must be at "
                                    f"most {MAX_RUNNING_LIMIT} (each sequence holds a KV cache)")
        if self.ort_threads > MAX_ORT_THREADS:
            raise SettingsError(f"BANTER_ORT_THREADS={self.ort_threads}: must be at most "
                                f"{MAX_ORT_THREADS} (0: ONNX Runtime's default, one per core)")
        if self.worker_concurrency > MAX_WORKER_CONCURRENCY:
            raise SettingsError(f"BANTER_WORKER_CONCURRENCY={self.worker_concurrency} (or "
                                f"--concurrency): must be at most {MAX_WORKER_CONCURRENCY} (each "
                                "is a thread of the worker, and its prefetch)")
        if self.bulk_concurrency and self.bulk_concurrency >= self.worker_concurrency:
            raise SettingsError(f"BANTER_BULK_CONCURRENCY={self.bulk_concurrency}: must be under "
                                f"BANTER_WORKER_CONCURRENCY ({self.worker_concurrency}, or "
                                "--concurrency), so that some of a worker's threads are always "
                                "free for interactive jobs")
        if self.stream_maxlen <= self.max_tokens_limit + 1:
            raise SettingsError(f"BANTER_STREAM_MAXLEN={self.stream_maxlen}: must be over "
                                f"BANTER_MAX_TOKENS_LIMIT + 1 ({self.max_tokens_limit + 1}: a "
                                "token entry per token and the final event), or a long "
                                "generation's stream loses its first tokens")
        if self.default_max_tokens > self.max_tokens_limit:
            raise SettingsError(f"BANTER_DEFAULT_MAX_TOKENS={self.default_max_tokens}: must not "
                                f"be over BANTER_MAX_TOKENS_LIMIT ({self.max_tokens_limit})")
        for name in ("default_generate_model", "default_embed_model"):
            try:
                parse_ref(getattr(self, name))
            except InvalidRequest as exc:  # every request naming no model would be refused
                raise SettingsError(f"BANTER_{name.upper()}: {exc.message}") from None
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(f"BANTER_LOG_LEVEL={self.log_level!r}: expected one of "
                                f"{', '.join(LOG_LEVELS)}")
        for name in ("queue_interactive", "queue_bulk"):
            queue = getattr(self, name)
            if not queue or any(c.isspace() or c == "," for c in queue):
                raise SettingsError(f"BANTER_{name.upper()}={queue!r}: a queue name must be "
                                    "non-empty, without spaces or commas")
        if len({*self.queues, *self.openai_queues}) < 4:
            raise SettingsError(f"BANTER_QUEUE_INTERACTIVE={self.queue_interactive!r} and "
                                f"BANTER_QUEUE_BULK={self.queue_bulk!r} share a queue (each lane "
                                f"also has '<name>{OPENAI_QUEUE_SUFFIX}'): each lane needs queues "
                                "of its own, or interactive jobs wait behind the bulk backlog")
        if self.openai_base_url:
            parts = urlparse(self.openai_base_url)
            try:
                port_ok = parts.port is None or parts.port > 0
            except ValueError:
                port_ok = False
            if parts.scheme not in ("http", "https") or not parts.netloc or not port_ok or \
                    self.openai_base_url != self.openai_base_url.strip():
                raise SettingsError(f"BANTER_OPENAI_BASE_URL={self.openai_base_url!r}: expected "
                                    "an http:// or https:// URL, e.g. http://127.0.0.1:8080/v1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> "Settings":
        """Read ``BANTER_*`` variables (unknown ones are ignored) and ``OPENAI_API_KEY`` when
        ``BANTER_OPENAI_KEY`` is not set; ``overrides`` win."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            name = f"BANTER_{f.name.upper()}"
            if name not in env:
                continue
            raw = env[name]
            if f.type == "bool":
                values[f.name] = _bool(name, raw)
            elif f.type == "int":
                values[f.name] = _int(name, raw, low=0 if f.name in _ZERO_ALLOWED else 1)
            elif f.type == "float":
                values[f.name] = _float(name, raw, positive=f.name in _POSITIVE)
            elif f.type == "Path":
                if raw.strip():  # empty: the default, as for every path setting
                    values[f.name] = _path(name, Path(raw))
            else:
                values[f.name] = raw
        if "openai_key" not in values and "OPENAI_API_KEY" in env:
            values["openai_key"] = env["OPENAI_API_KEY"]
        values.update(overrides)
        return cls(**values).resolved()

    def resolved(self) -> "Settings":
        """Fill derived defaults and make paths absolute."""
        home = _path("BANTER_HOME", self.home)
        own_root = self.model_root != Path()  # else under home (from_env makes "." absolute)
        own_registry = self.registry_path != Path()
        model_root = (_path("BANTER_MODEL_ROOT", self.model_root) if own_root
                      else _path("BANTER_HOME", home / "models"))
        registry = (_path("BANTER_REGISTRY_PATH", self.registry_path) if own_registry
                    else _path("BANTER_HOME", home / "registry" / "history.jsonl"))
        if registry.is_dir():
            raise SettingsError(f"BANTER_REGISTRY_PATH={str(registry)!r} is a directory: name "
                                "the history file (e.g. .../registry/history.jsonl)")
        _check_directories("BANTER_HOME", home, home)
        _check_directories("BANTER_MODEL_ROOT" if own_root else "BANTER_HOME", model_root,
                           model_root)
        _check_directories("BANTER_REGISTRY_PATH" if own_registry else "BANTER_HOME", registry,
                           registry.parent)
        _check_url("BANTER_REDIS_URL", self.redis_url, REDIS_SCHEMES)
        if self.broker_url:
            _check_url("BANTER_BROKER_URL", self.broker_url, BROKER_SCHEMES)
        elif urlparse(self.redis_url).scheme == "unix":
            raise SettingsError("BANTER_REDIS_URL is a unix socket, which the Celery broker "
                                "cannot use: set BANTER_BROKER_URL to the same Redis over TCP "
                                "(redis://host:port/db)")
        broker = self.broker_url or self.redis_url
        return replace(self, home=home, model_root=model_root, registry_path=registry,
                        broker_url=broker)

    def bulk_limit(self) -> int:
        """Bulk messages a worker holds at once (the rest of its concurrency is for
        interactive ones)."""
        return self.bulk_concurrency or max(1, self.worker_concurrency * 3 // 4)

    @property
    def queues(self) -> tuple[str, str]:
        return (self.queue_interactive, self.queue_bulk)

    @property
    def openai_queues(self) -> tuple[str, str]:
        """The two lanes' queues of the openai backend."""
        return (self.queue_interactive + OPENAI_QUEUE_SUFFIX, self.queue_bulk + OPENAI_QUEUE_SUFFIX)

    @property
    def worker_live_s(self) -> float:
        """A worker is live while its last heartbeat is at most this old: three periods."""
        return 3 * self.worker_heartbeat_s

    @property
    def resend_after_s(self) -> float:
        """How long a job may stay queued, with its lane's queue empty, before a worker sends
        its task again (a message lost with Redis, or never sent): twice the visibility
        timeout, after which a message reserved by a dead worker has come back on its own."""
        return 2.0 * self.visibility_timeout_s

    def lane_queue(self, lane: str, backend: str = "onnx") -> str:
        """The Celery queue of a job of ``lane`` going to ``backend`` (``onnx`` or ``openai``)."""
        queue = self.queue_bulk if lane == "bulk" else self.queue_interactive
        return queue + OPENAI_QUEUE_SUFFIX if backend == "openai" else queue

    def lane_queues(self, lane: str) -> tuple[str, str]:
        """Both backends' queues of ``lane``: (onnx, openai)."""
        return (self.lane_queue(lane), self.lane_queue(lane, "openai"))

    def fallback_blocker(self) -> str:
        """Why a job that no local model can serve may not fall back to the openai backend,
        naming the setting to change; empty when it may."""
        if not self.openai_fallback:
            return "the openai fallback is off (BANTER_OPENAI_FALLBACK=false)"
        if not self.openai_key:
            return "no OpenAI key is set: set BANTER_OPENAI_KEY or OPENAI_API_KEY to fall back " \
                   "to the openai backend"
        return ""

    def max_batch(self) -> int:
        return self.inference_max_batch_size if self.enable_batching else 1

