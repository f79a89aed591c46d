"""The 1,000-job soak (``python -m bench soak``): mixed jobs from 64 concurrent clients against
the whole stack, none lost, none duplicated, no 5xx (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

KEYS = ("scenario", "unit", "served", "baselines", "ratios", "lost", "duplicated", "http_5xx",
        "http_429", "wrong_results", "failed_ops", "peak_rss_mb", "rss_mb", "counts",
        "latency_ms", "http_latency_ms", "leftovers", "problems", "settings", "machine",
        "duration_s")


@pytest.mark.slow
def test_soak_1000_jobs_64_clients():
    run = subprocess.run([sys.executable, "-m", "bench", "soak", "--jobs", "1000",
                          "--clients", "64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    # exit code 1 with the JSON on stdout: the soak ran and found something; anything else is
    # a crash (its reason on stderr)
    assert run.returncode in (0, 1) and run.stdout.strip(), run.stderr[-3000:]
    result = json.loads(run.stdout)
    for key in KEYS:
        assert key in result, key
    assert result["scenario"] == "soak" and result["unit"] == "jobs/s"
    assert set(result["peak_rss_mb"]) >= {"producer", "worker"}
    assert result["peak_rss_mb"]["producer"] > 0 and result["peak_rss_mb"]["worker"] > 0
    assert result["settings"]["jobs"] == 1000 and result["settings"]["clients"] == 64
    assert result["counts"]["ops"] == 1000

    problems = result["problems"]
    assert result["lost"] == 0, problems
    assert result["duplicated"] == 0, problems
    assert result["http_5xx"] == 0, result["counts"]["http"]
    assert result["wrong_results"] == 0, problems
    assert result["failed_ops"] == 0, problems
    assert result["counts"]["job_statuses"] == {"succeeded": result["counts"]["job_records"]}
    assert result["counts"]["job_records"] == result["counts"]["jobs_accepted"]
    assert run.returncode == 0
