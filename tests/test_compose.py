"""docker-compose.yml has the services, GPU pinning, health checks and volumes the docs promise
(no Docker engine here: the file's structure is what we can check)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import WORKER_NODE

COMPOSE = yaml.safe_load((Path(__file__).parent.parent / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_services_present():
    assert {"redis", "producer", "gpu0", "gpu1", "worker-cpu", "flower"} <= set(SERVICES)


def test_redis_keeps_data_and_never_evicts():
    command = SERVICES["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in SERVICES["redis"]["volumes"])


def test_each_gpu_worker_reserves_one_device_and_pins_to_it():
    for name, host_gpu in (("gpu0", "0"), ("gpu1", "1")):
        service = SERVICES[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [host_gpu], "capabilities": ["gpu"]}]
        command = service["command"]
        assert command[:3] == ["banter", "worker", "--gpu"]
        assert command[command.index("--name") + 1].startswith(f"{name}@")
        # the extras bring CUDA and cuDNN, which the Dockerfile registers with the loader
        assert service["build"]["args"]["ORT"] == "onnxruntime-gpu[cuda,cudnn]"
    dockerfile = (Path(__file__).parent.parent / "Dockerfile").read_text()
    assert "/etc/ld.so.conf.d/" in dockerfile and "ldconfig" in dockerfile


def test_cpu_worker_is_a_profile():
    assert SERVICES["worker-cpu"]["profiles"] == ["cpu"]
    assert "--cpu" in SERVICES["worker-cpu"]["command"]


def test_every_banter_service_shares_redis_models_and_registry():
    for name in ("producer", "gpu0", "gpu1", "worker-cpu", "flower"):
        service = SERVICES[name]
        env = service["environment"]
        assert env["BANTER_REDIS_URL"] == "redis://redis:6379/0"
        assert env["BANTER_REGISTRY_PATH"].startswith("/data/")
        if name != "flower":
            assert "banter-data:/data" in service["volumes"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert {"redis-data", "banter-data"} <= set(COMPOSE["volumes"])


def test_health_checks():
    for name in ("redis", "producer", "gpu0", "gpu1", "worker-cpu", "flower"):
        assert SERVICES[name]["healthcheck"]["test"][0] == "CMD", name


def test_each_worker_is_healthy_by_its_own_heartbeat_only(stack_env, worker):
    """The workers' health check, run as compose runs it, against a real worker: healthy by
    its own node's heartbeat, not by another worker's (a dead gpu1 beside a live gpu0)."""
    for name in ("gpu0", "gpu1"):
        service = SERVICES[name]
        command = service["command"]
        assert service["environment"]["HEALTHCHECK_NODE"] == command[command.index("--name") + 1]
    for name in ("gpu0", "gpu1", "worker-cpu"):
        assert SERVICES[name]["restart"] == "unless-stopped"  # an engine death (exit 70)
    # the CPU worker keeps its default name, cpu@HOSTNAME, unique per container when scaled
    assert "--name" not in SERVICES["worker-cpu"]["command"]
    assert "HEALTHCHECK_NODE" not in SERVICES["worker-cpu"]["environment"]
    check = SERVICES["worker-cpu"]["healthcheck"]["test"][1:]
    assert check[0] == "python"
    check = [sys.executable, *check[1:]]  # the image's python: this one has banter installed

    def healthy(node: str | None) -> bool:
        env = {k: v for k, v in os.environ.items() if k != "HEALTHCHECK_NODE"}
        env.update({"BANTER_REDIS_URL": stack_env["BANTER_REDIS_URL"],
                    **({"HEALTHCHECK_NODE": node} if node else {})})
        return subprocess.run(check, env=env, timeout=30).returncode == 0

    assert healthy(WORKER_NODE)
    assert not healthy("gpu1@compose")
    assert not healthy(None)  # cpu@ this host: no such worker beats here


def test_published_ports_are_listened_on_every_interface():
    """A port compose publishes reaches the container only if its server listens beyond the
    container's own loopback."""
    producer, flower = SERVICES["producer"]["command"], SERVICES["flower"]["command"]
    assert producer[producer.index("--host") + 1] == "0.0.0.0"
    assert flower[flower.index("--address") + 1] == "0.0.0.0"


def test_flower_requires_auth():
    assert "BANTER_FLOWER_BASIC_AUTH" in SERVICES["flower"]["environment"]
    assert SERVICES["flower"]["command"][:2] == ["banter", "flower"]
