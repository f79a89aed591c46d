"""``banter``: one command per role. Exit codes: EXIT_OK 0, EXIT_FAILED 1 (the request or job
failed), EXIT_USAGE 2 (bad arguments or settings), EXIT_UNAVAILABLE 3 (server, Redis or broker
unreachable; a 429: a full queue, a rate limit; or the producer's 503 for what it lacks for
now: its Redis or broker, the registry, a live worker for the model's backend, a wait
interrupted, a model that cannot be served until an admin acts), EXIT_INTERRUPTED 130
(Ctrl-C)."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from dataclasses import asdict, replace
from pathlib import Path
from urllib.parse import urlsplit

import redis

from banter.errors import BanterError, InvalidRequest, Throttled, Unavailable, status_for
from banter.netaddr import bare_host, host_port
from banter.settings import Settings, SettingsError, parse_int, parse_number

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141  # as a process killed by SIGPIPE reports it
JOB_ID = re.compile(r"[A-Za-z0-9-]+")


CLIENT_FLAGS = {"url": "--url", "api_key": "--api-key", "timeout": "--timeout"}


def client_defaults() -> dict[str, object]:
    return {"url": os.environ.get("BANTER_URL", "http://127.0.0.1:8000"),
            "api_key": os.environ.get("BANTER_API_KEY"), "timeout": 300.0}


def _client(args: argparse.Namespace):
    """The client the flags ask for; a default from BANTER_URL or BANTER_API_KEY is checked as
    its flag is (SettingsError, exit 2): ``banter models`` takes the flags without defaults."""
    from banter.client import Client

    given = {**client_defaults(), **{k: getattr(args, k) for k in CLIENT_FLAGS if hasattr(args, k)}}
    for name, check, variable in (("url", server_url, "BANTER_URL"),
                                  ("api_key", api_key, "BANTER_API_KEY")):
        if not hasattr(args, name) and given[name] is not None:
            try:
                check(given[name])
            except argparse.ArgumentTypeError as exc:
                raise SettingsError(f"{variable}: {exc}") from None
    return Client(given["url"], given["api_key"], given["timeout"])


def check_port_free(host: str, port: int) -> None:
    """OSError (exit 2) when something already listens on ``host:port``: gunicorn would retry
    for seconds then exit 1, and ``banter up`` would find the other server ready."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
    except UnicodeError:  # a label over 63 characters, which IDNA cannot encode
        raise OSError(f"cannot listen on {host!r}: not a host name") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            sock.bind(address)
        except OSError as exc:
            raise OSError(f"cannot listen on {host_port(host, port)}: {exc.strerror} (is "
                          "another server there? pick another --port)") from None


def cmd_up(args, settings: Settings) -> int:
    from banter.stack import up

    check_port_free(args.host, args.port)
    return up(settings, args.host, args.port, sample=args.sample or args.exit_after_sample,
              exit_after_sample=args.exit_after_sample)


def cmd_producer(args, settings: Settings) -> int:
    from producer.server import serve

    check_port_free(args.host, args.port)
    serve(settings, args.host, args.port, workers=args.workers, threads=args.threads)
    return EXIT_OK


def cmd_worker(args, settings: Settings) -> int:
    from workers.main import run_openai_worker, run_worker

    if args.concurrency:  # the worker's threads, and the bulk share and prefetch made of them
        settings = replace(settings, worker_concurrency=args.concurrency)
    if args.openai:
        return run_openai_worker(settings, args.name)
    return run_worker(settings, None if args.cpu else args.gpu, args.name)


def cmd_submit(args, settings: Settings) -> int:
    client = _client(args)
    model = {"model": args.model} if args.model else {}
    if args.embed:
        given = [name for name, value in (("--stream", args.stream),
                                          ("--max-tokens", args.max_tokens is not None)) if value]
        if given:
            print(f"banter: {' and '.join(given)} {'is' if len(given) == 1 else 'are'} for "
                  "generation, not --embed", file=sys.stderr)
            return EXIT_USAGE
        body = {"input": args.text, **model}
        answer = client.request("POST", "/v1/embeddings", body)
        print(json.dumps(client.field(answer, "data", 0, "embedding", of=list)))
        return EXIT_OK
    body = {"prompt": args.text, **model,
            **({"max_tokens": args.max_tokens} if args.max_tokens is not None else {})}
    if not args.stream:
        answer = client.request("POST", "/v1/inference", body)
        _print_text(client.field(answer, "text", of=str))
        return _ended(client.field(answer, "finish_reason", of=str))
    return _print_events(client.events("/v1/inference?stream=true", body, method="POST"))


def cmd_stream(args, settings: Settings) -> int:
    client = _client(args)
    job = client.request("GET", f"/v1/jobs/{args.job_id}")
    kind = client.field(job, "kind", of=str)
    if kind != "generate":
        print(f"banter: job {args.job_id} is an {kind} job: it streams no tokens; its result "
              f"is in GET /v1/jobs/{args.job_id} (status {client.field(job, 'status', of=str)})",
              file=sys.stderr)
        return EXIT_USAGE
    return _print_events(client.events(f"/v1/jobs/{args.job_id}/events"))


ENDED = {"cancelled": "the job was cancelled (DELETE /v1/jobs/{id}, or its client left)",
         "expired": "the job expired: its deadline (deadline_s) passed"}


def _ended(finish_reason: str) -> int:
    """EXIT_OK for a generation that finished (``stop``, ``length``); else say why it ended."""
    if finish_reason in ("stop", "length"):
        return EXIT_OK
    print(f"banter: {ENDED.get(finish_reason, finish_reason)}", file=sys.stderr)
    return EXIT_FAILED


def _print_text(text: str) -> None:
    """A generation's text on stdout, its last line ended (nothing at all for no text)."""
    print(text, end="" if not text or text.endswith("\n") else "\n", flush=True)


def _print_events(events) -> int:
    """Tokens to stdout as they come, the last line ended however the stream ends (so an
    error on stderr, or the shell's prompt, starts a line of its own); nothing for no text."""
    open_line = False  # token text on stdout since its last newline
    final = None
    try:
        for event, data in events:
            if event == "job":
                print(f"job {data['id']}", file=sys.stderr, flush=True)
            elif event == "token":
                print(data["text"], end="", flush=True)
                if data["text"]:
                    open_line = not data["text"].endswith("\n")
            elif event in ("done", "error"):
                final = event, data
                break
    finally:  # also when the stream was cut (Client.events raised)
        if open_line:
            print(flush=True)
    if final is None:
        return EXIT_FAILED  # not reached: Client.events ends after done or error, or raises
    event, data = final
    if event == "done":
        return _ended(data["finish_reason"])
    print(f"banter: {data['error']['type']}: {data['error']['message']}", file=sys.stderr)
    return _failed(status_for(data["error"]["type"]))


def _failed(status: int) -> int:
    """EXIT_UNAVAILABLE for an error that says "not now": a 503 (no worker, a checksum
    mismatch, a model that does not load) or a 429 (a full queue, the key's rate limit);
    else EXIT_FAILED."""
    return EXIT_UNAVAILABLE if status in (Throttled.status, Unavailable.status) else EXIT_FAILED


def cmd_bulk(args, settings: Settings) -> int:
    """Exit 0 once every valid line has its output line (failed requests included: see the
    summary), 2 for unusable files (duplicate custom_ids, an output file that is not ours)."""
    from banter import bulk

    out_path = args.out
    err_path = args.errors or bulk.default_errors_path(out_path)
    paths = {p.resolve() for p in (args.input, out_path, err_path)}
    if len(paths) < 3:
        print("banter: the input, --out and --errors files must be three different files",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = bulk.run(lambda: _client(args), args.input, out_path,
                           err_path, args.max_in_flight)
    except bulk.BulkFileError as exc:
        print(f"banter: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"banter bulk: interrupted with {_count_lines(out_path)} output lines in "
              f"{out_path}; run the same command again to resume (lines already answered are "
              "not sent again)", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps(asdict(summary)))
    return EXIT_OK


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def flower_auth(args) -> list[str] | None:
    """Flower's auth arguments: ``--basic-auth`` (or BANTER_FLOWER_BASIC_AUTH), comma-separated
    ``user:password`` pairs, or none with ``--unauthenticated``; None when neither was chosen."""
    if args.unauthenticated:
        return []
    pairs = args.basic_auth or os.environ.get("BANTER_FLOWER_BASIC_AUTH", "")
    if not pairs:
        return None
    for pair in pairs.split(","):
        user, _, password = pair.partition(":")
        if not user or not password:
            raise SettingsError("basic auth must be user:password (comma-separated for several "
                                "users), with neither part empty")
    return [f"--basic-auth={pairs}"]


def cmd_flower(args, settings: Settings) -> int:
    """Flower on the broker, read-only (no worker shutdown, pool or revoke controls). It shows
    every job as a task (``banter.run_job``, its only argument the job id, so no prompt text),
    with state, worker node and runtime."""
    auth = flower_auth(args)
    if auth is None:
        print("banter: refusing to start Flower without a choice of authentication: pass "
              "--basic-auth user:password (or set BANTER_FLOWER_BASIC_AUTH), or "
              "--unauthenticated for local use", file=sys.stderr)
        return EXIT_USAGE
    from banter import logs
    from banter.broker import make_celery

    check_port_free(args.address, args.port)
    logs.setup(settings.log_level)
    if args.unauthenticated:
        os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"  # else Flower answers its API 401
    app = make_celery(settings, "banterhearts-flower")
    try:
        code = app.start(["flower", f"--port={args.port}", f"--address={args.address}",
                          "--read_only=true", *auth]) or EXIT_OK
    except SystemExit as exc:  # Flower's SIGTERM handler, or its command's end
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else EXIT_OK if exc.code is None else 1
    # its threads retry a broker that went away for as long as it stays away, and an interpreter
    # exit would wait on them: end the process here
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_models(args, settings: Settings) -> int:
    given = [flag for name, flag in CLIENT_FLAGS.items() if hasattr(args, name)]
    if args.action in ("build-demo", "import") and given:
        print(f"banter: {', '.join(given)}: for the actions that ask a server (promote, "
              f"rollback, history, list); models {args.action} works on local files",
              file=sys.stderr)
        return EXIT_USAGE
    if args.action == "build-demo":
        from banter.demo import build_demo

        for name, path in build_demo(args.root or settings.model_root).items():
            print(f"{name}\t{path}")
        return EXIT_OK
    if args.action == "import":
        return cmd_models_import(args, settings)
    client = _client(args)
    if args.action == "promote":
        if args.backend == "onnx" and not args.path:
            print("banter: PATH (the artifact under the model root) is required with "
                  "--backend onnx", file=sys.stderr)
            return EXIT_USAGE
        if args.backend == "openai" and not args.model:
            print("banter: --model (the upstream model name) is required with --backend openai",
                  file=sys.stderr)
            return EXIT_USAGE
        body = {"name": args.name, "kind": args.kind, "backend": args.backend,
                "reason": args.reason, **({"path": args.path} if args.path else {}),
                **({"model": args.model} if args.model else {})}
        status, out = client.answer("POST", "/v1/models/promote", body)
        if status == 200:  # 201 makes a version; 200 answers the one already active
            print(f"banter: {client.field(out, 'ref', of=str)} is already the active version of "
                  f"{client.field(out, 'name', of=str)} with that artifact: nothing changed",
                  file=sys.stderr)
    elif args.action == "rollback":
        out = client.request("POST", "/v1/models/rollback", {"name": args.name,
                                                              "reason": args.reason})
    elif args.action == "history":
        out = client.field(client.request("GET", "/v1/models/history",
                                          params={"name": args.name} if args.name else None),
                           "data", of=list)
    else:
        out = client.field(client.request("GET", "/v1/models"), "data", of=list)
    print(json.dumps(out, indent=2))
    return EXIT_OK


def cmd_models_import(args, settings: Settings) -> int:
    """Convert a local Hugging Face model directory (or write a random GPT-2-small-shaped
    decoder) into the model root; print where, and the promote command to run (or, for a
    directory outside the model root, what to do first). Exit 2 for a bad argument
    (BadImportArgument), 1 when a usable directory cannot be converted."""
    from banter import importer

    if not args.random_gpt2_small and args.dir is None:
        print("banter: give the model directory to import (or --random-gpt2-small)",
              file=sys.stderr)
        return EXIT_USAGE
    if args.random_gpt2_small and args.kind not in (None, "generate"):
        print(f"banter: --random-gpt2-small writes a generate model, not --kind {args.kind}",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        result = _import(args, settings)
    except importer.BadImportArgument as exc:
        print(f"banter: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    print(f"imported {result.model_type} ({result.kind} model) in {result.seconds:.1f} s "
          f"(max |onnx - numpy reference| {result.max_abs_diff:.2g})", file=sys.stderr)
    print(result.path.resolve())
    command = importer.promote_command(settings.model_root, result)
    if command is None:
        print(f"banter: {result.path.resolve()} is outside the model root "
              f"{settings.model_root} (BANTER_MODEL_ROOT), so it cannot be promoted from there: "
              f"move or copy it under the model root (e.g. to {settings.model_root / result.name}"
              f", then run: banter models promote {result.name} {result.name} --kind "
              f"{result.kind}), or set BANTER_MODEL_ROOT to a directory that holds it, for the "
              "producer and workers too", file=sys.stderr)
    else:
        print(command)
    return EXIT_OK


def _import(args, settings: Settings):
    """Run the import ``args`` ask for; its ``importer.Imported``."""
    from banter import importer

    if args.random_gpt2_small:
        name = importer.check_name(args.name or "gpt2-small-random")
        out = args.out or args.dir or settings.model_root / name
        return importer.write_random_gpt2(out, name=name, overwrite=args.overwrite)
    name = importer.check_name(args.name or importer.default_name(args.dir))
    return importer.import_model(args.dir, args.out or settings.model_root / name,
                                 name=name, kind=args.kind, overwrite=args.overwrite)


def server_url(raw: str) -> str:
    """``--url``: an http(s) URL with a host (a malformed one is a usage error, exit 2)."""
    parts = urlsplit(raw)
    try:
        port = parts.port  # None when not given; raises for one out of range or not a number
    except ValueError:
        port = 0
    if port == 0:
        raise argparse.ArgumentTypeError(f"{raw!r} has no valid port (1-65535)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an http:// or https:// URL with a host")
    if "@" in parts.netloc:  # it would be printed in messages, and replace the key's header
        raise argparse.ArgumentTypeError("the URL holds a user or password: give the API key "
                                         "with --api-key (or BANTER_API_KEY), not in the URL")
    return raw


def api_key(raw: str) -> str:
    """``--api-key`` (or BANTER_API_KEY): printable ASCII without spaces, as the keys the
    producer accepts are, so that it can go in an HTTP header (a usage error, exit 2)."""
    if not all("!" <= ch <= "~" for ch in raw):
        raise argparse.ArgumentTypeError("the API key (--api-key or BANTER_API_KEY) must be "
                                         "printable ASCII without spaces")
    return raw


def job_id(raw: str) -> str:
    """``JOB_ID``: letters, digits and '-' only (a job id is a UUID), so that it names one
    job's path: an empty id, a space or a '/' is a usage error (exit 2), not a 404."""
    if not JOB_ID.fullmatch(raw):
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not a job id: a job id is the UUID that POST /v1/jobs answers and "
            "'banter submit --stream' prints (job ID), e.g. 0c6f7a4e-5b1d-4c3a-9e2f-1a2b3c4d5e6f")
    return raw


def timeout_seconds(raw: str) -> float:
    """``--timeout``: seconds, more than 0 and at most a day."""
    try:
        value = parse_number(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be seconds, more than 0 and at most 86400, "
                                         f"got {raw[:32]!r}")
    return value


def port_number(raw: str) -> int:
    value = parse_int(raw)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 1 to 65535, got {value}")
    return value


def gpu_index(raw: str) -> int:
    value = parse_int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a GPU index, 0 or more, got {value}")
    return value


def node_name(raw: str) -> str:
    """A Celery node name: ``name@host`` or ``name``, without spaces or commas (Celery's
    ``--destination`` and Flower list nodes separated by commas)."""
    if not re.fullmatch(r"[A-Za-z0-9._@%-]{1,128}", raw):
        raise argparse.ArgumentTypeError(f"{raw[:64]!r}: use letters, digits, '.', '_', '-', "
                                         "'%' and '@' (e.g. gpu0@host)")
    return raw


def positive_int(raw: str) -> int:
    value = parse_int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


MAX_PRODUCER_WORKERS = 256  # gunicorn processes; each is a whole Flask app
MAX_THREADS = 4096  # a producer process's request threads, banter bulk's requests in flight


def at_most(limit: int):
    """argparse type: an integer from 1 to ``limit`` (a size past it would start more
    processes or threads than a machine runs, and tie it up until it is killed)."""
    def parse(raw: str) -> int:
        value = positive_int(raw)
        if value > limit:
            raise argparse.ArgumentTypeError(f"must be at most {limit}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse's "invalid integer value: 'x'"
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="banter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def client_args(cmd: argparse.ArgumentParser, defaults: bool = True) -> None:
        """``defaults`` False: the flags of a sub-action whose parent parser has them too, so
        they may come before the action or after it (argparse would otherwise let the
        sub-action's defaults overwrite what was given before it)."""
        values = client_defaults()

        def default(name: str):
            return values[name] if defaults else argparse.SUPPRESS

        cmd.add_argument("--url", type=server_url, default=default("url"))
        cmd.add_argument("--api-key", type=api_key, default=default("api_key"))
        cmd.add_argument("--timeout", type=timeout_seconds, default=default("timeout"),
                         metavar="SECONDS",
                         help="give up on a server that sends nothing for this long "
                              "(default 300; a stream's keep-alives come every 15 s)")

    def listen_args(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--host", type=bare_host, default="127.0.0.1",
                         help="interface the producer listens on (default 127.0.0.1; an IPv6 "
                              "address with or without brackets)")
        cmd.add_argument("--port", type=port_number, default=8000, help="its port (default 8000)")

    up = sub.add_parser("up", help="run the whole stack on embedded defaults")
    listen_args(up)
    up.add_argument("--sample", action="store_true", help="send a sample job through it")
    up.add_argument("--exit-after-sample", action="store_true",
                    help="send the sample jobs, then stop everything")
    up.set_defaults(func=cmd_up)

    prod = sub.add_parser("producer", help="run the HTTP producer (gunicorn, gthread)")
    listen_args(prod)
    prod.add_argument("--workers", type=at_most(MAX_PRODUCER_WORKERS), default=2,
                      help=f"gunicorn worker processes (default 2, at most {MAX_PRODUCER_WORKERS})")
    prod.add_argument("--threads", type=at_most(MAX_THREADS), default=64,
                      help="threads per worker: requests each can hold open (default 64, at "
                           f"most {MAX_THREADS})")
    prod.set_defaults(func=cmd_producer)

    worker = sub.add_parser("worker", help="run one worker (one per GPU)")
    device = worker.add_mutually_exclusive_group(required=True)
    device.add_argument("--gpu", type=gpu_index, metavar="N", help="pin to GPU N (CUDA)")
    device.add_argument("--cpu", action="store_true", help="CPU only")
    device.add_argument("--openai", action="store_true",
                        help="no engine: every job goes upstream (needs an OpenAI key)")
    worker.add_argument("--name", type=node_name,
                        help="Celery node name (default gpuN@host or cpu@host)")
    worker.add_argument("--concurrency", type=positive_int,
                        help="jobs in flight (threads; default BANTER_WORKER_CONCURRENCY)")
    worker.set_defaults(func=cmd_worker)

    submit = sub.add_parser("submit", help="send one prompt and print the result")
    submit.add_argument("text")
    submit.add_argument("--embed", action="store_true", help="an embedding, not generation")
    submit.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    submit.add_argument("--model", help="name or name@version (default: the server's default)")
    submit.add_argument("--max-tokens", type=positive_int,
                        help="default: the server's BANTER_DEFAULT_MAX_TOKENS")
    client_args(submit)
    submit.set_defaults(func=cmd_submit)

    stream = sub.add_parser("stream", help="print a job's tokens (replay, then live)")
    stream.add_argument("job_id", type=job_id)
    client_args(stream)
    stream.set_defaults(func=cmd_stream)

    bulk = sub.add_parser("bulk", help="run an OpenAI Batch JSONL file on the bulk lane")
    bulk.add_argument("input", type=Path, metavar="IN.jsonl")
    bulk.add_argument("--out", type=Path, required=True, metavar="OUT.jsonl",
                      help="output lines are appended; rerunning resumes")
    bulk.add_argument("--errors", type=Path, metavar="ERR.jsonl",
                      help="bad input lines (default OUT.errors.jsonl)")
    bulk.add_argument("--max-in-flight", type=at_most(MAX_THREADS), default=64, metavar="N",
                      help=f"requests in flight at once (default 64, at most {MAX_THREADS})")
    client_args(bulk)
    bulk.set_defaults(func=cmd_bulk)

    flower = sub.add_parser("flower", help="run Flower (Celery monitoring) on the broker")
    flower.add_argument("--port", type=port_number, default=5555)
    flower.add_argument("--address", type=bare_host, default="127.0.0.1")
    auth = flower.add_mutually_exclusive_group()
    auth.add_argument("--basic-auth", metavar="USER:PASSWORD",
                      help="default BANTER_FLOWER_BASIC_AUTH")
    auth.add_argument("--unauthenticated", action="store_true",
                      help="no login, API open (local use only)")
    flower.set_defaults(func=cmd_flower)

    models = sub.add_parser("models", help="the model registry")
    # promote, rollback, history, list: before the action or after it (build-demo and import
    # work on local files and refuse them)
    client_args(models, defaults=False)
    actions = models.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build-demo", help="write the demo models")
    build.add_argument("--root", type=Path)
    imp = actions.add_parser(
        "import", help="convert a local Hugging Face model directory (bert, gpt2) to ONNX",
        description="Convert DIR (config.json, model.safetensors, tokenizer.json; bert -> embed, "
                    "gpt2 -> generate) into model.onnx + tokenizer.json + config.json, checked "
                    "against a numpy reference; no torch needed (pytorch_model.bin is not "
                    "supported). Needs pip install 'banterhearts[import]'.")
    imp.add_argument("dir", nargs="?", type=Path, metavar="DIR",
                     help="the model directory (with --random-gpt2-small: the output directory)")
    imp.add_argument("--out", type=Path, metavar="OUT_DIR",
                     help="where to write (default MODEL_ROOT/NAME)")
    imp.add_argument("--name", help="registry name (default from DIR)")
    imp.add_argument("--overwrite", action="store_true",
                     help="replace the files of an output directory that holds some (refused "
                          "by default: a promoted version may be served from them)")
    imp.add_argument("--kind", choices=("embed", "generate"),
                     help="check the model is of this kind (bert: embed, gpt2: generate)")
    imp.add_argument("--random-gpt2-small", action="store_true",
                     help="write a GPT-2-small-shaped decoder with random weights and the demo "
                          "tokenizer (~340 MB, for timing; never commit it)")
    promote = actions.add_parser("promote", help="make an artifact the active version")
    promote.add_argument("name")
    promote.add_argument("path", nargs="?", help="artifact under the model root")
    promote.add_argument("--kind", required=True, choices=("generate", "embed"))
    promote.add_argument("--backend", default="onnx", choices=("onnx", "openai"))
    promote.add_argument("--model", help="upstream model name (openai backend)")
    promote.add_argument("--reason", default="")
    rollback = actions.add_parser("rollback", help="restore the previous version")
    rollback.add_argument("name")
    rollback.add_argument("--reason", default="")
    history = actions.add_parser("history", help="every registry change")
    history.add_argument("name", nargs="?")
    actions.add_parser("list", help="active models")
    for action in (promote, rollback, history, actions.choices["list"]):
        client_args(action, defaults=False)
    models.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # text the terminal's encoding lacks becomes "?"
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        code = args.func(args, settings)
        sys.stdout.flush()  # here, where a reader that left is caught
        return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout left (a pipe into head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE_CLOSED
    except Unavailable as exc:
        print(f"banter: {exc.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except redis.RedisError as exc:  # a server command's Redis (BANTER_REDIS_URL) at start
        print(f"banter: Redis is not reachable (BANTER_REDIS_URL): {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except InvalidRequest as exc:
        print(f"banter: {exc.type}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE if exc.type == "invalid_setting" else EXIT_FAILED
    except BanterError as exc:
        print(f"banter: {exc.type}: {exc.message}", file=sys.stderr)
        return _failed(exc.status)
    except OSError as exc:  # a path or port given on the command line that cannot be used
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"banter: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
