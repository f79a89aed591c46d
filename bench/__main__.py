"""``python -m bench SCENARIO [flags]``: run one benchmark scenario, print one JSON object.

Exit codes: 0 the scenario ran (its JSON says whether the results were correct), 1 it could
not run (the error is on stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

# scenario name -> module (each has ``add_arguments(parser)`` and ``run(args) -> dict``)
SCENARIOS = {
    "generate": "bench.generate",
    "embed": "bench.embed",
    "latency": "bench.latency",
    "sse": "bench.sse",
    "lanes": "bench.lanes",
    "soak": "bench.soak",
    "kvcache": "bench.kvcache",
    "prefill": "bench.prefill",
}

log = logging.getLogger("bench")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"),
                   help="bench log level (stderr)")
    sub = p.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, module_name in SCENARIOS.items():
        module = importlib.import_module(module_name)
        scenario = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                                  description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(scenario)
        scenario.set_defaults(run=module.run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        result = args.run(args)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as exc:  # report on stderr, keep stdout for the JSON only
        log.exception("scenario %s failed: %s", args.scenario, exc)
        return 1
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
