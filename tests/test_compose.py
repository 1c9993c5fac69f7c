"""docker-compose.yml's shape (no Docker engine here): the app container is the image as built,
nginx inside facing clients; with the scale profile, one balancer (the same image and template)
fronts plain gunicorn replicas."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # (no types-PyYAML in requirements-dev)

from replicate_generation.edge import STOP_SECONDS
from servers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
APP = "replicate-generation"
REPLICAS = "replicas"
BALANCER = "balancer"
SERVICE_PORT = "5003"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    parsed = yaml.safe_load(COMPOSE.read_text())  # anchors and `<<` merged, as Compose does
    return dict(parsed["services"])


def _dockerfile_healthcheck() -> str:
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r'HEALTHCHECK .*?CMD \["python", "-c", "(.*?)"\]\n', text, re.S)
    assert match, "the Dockerfile's HEALTHCHECK is not the python probe this test expects"
    return match[1]


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match[1])


def test_the_app_publishes_the_service_port_and_runs_the_images_command(
        services: dict[str, Any]) -> None:
    app = services[APP]
    assert [str(port) for port in app["ports"]] == [f"{SERVICE_PORT}:{SERVICE_PORT}"]
    # No command: the Dockerfile's CMD (nginx in front, gunicorn on a private socket).
    assert "command" not in app and "profiles" not in app


def test_no_separate_proxy_and_no_config_mounted_from_the_checkout(
        services: dict[str, Any]) -> None:
    assert set(services) == {APP, REPLICAS, BALANCER, "redis", "postgres", "objects",
                             "objects-bucket"}
    for name in (APP, REPLICAS, BALANCER):
        mounted = [volume["target"] if isinstance(volume, dict) else str(volume).split(":")[1]
                   for volume in services[name].get("volumes", [])]
        assert set(mounted) <= {"/app/output", "/app/data"}, (name, mounted)
    assert not (ROOT / "deploy").exists(), "the proxy's config lives in the package now"


def test_every_container_of_the_image_is_health_checked_and_stopped_gracefully(
        services: dict[str, Any]) -> None:
    for name in (APP, REPLICAS, BALANCER):
        service = services[name]
        assert service["image"] == services[APP]["image"] and service["build"] == "."
        assert service["healthcheck"]["test"] == ["CMD", "python", "-c", _dockerfile_healthcheck()]
        # Past the supervisor's own limit (gunicorn's 30 s grace, then 2 s) before SIGKILL.
        assert _seconds(service["stop_grace_period"]) > STOP_SECONDS
        assert service["restart"] == "unless-stopped"


def test_the_scale_profile_puts_one_balancer_before_plain_gunicorn_replicas(
        services: dict[str, Any]) -> None:
    replicas, balancer = services[REPLICAS], services[BALANCER]
    assert replicas["profiles"] == balancer["profiles"] == ["scale"]
    # Replicas: gunicorn alone, reachable on the compose network only.
    assert replicas["command"] == ["replicate-generation", "serve"]
    assert "ports" not in replicas and [str(p) for p in replicas["expose"]] == [SERVICE_PORT]
    # The balancer: the same template in front of every replica, looked up by the service name.
    assert balancer["command"] == [
        "replicate-generation", "edge", "--upstream", f"{REPLICAS}:{SERVICE_PORT}"]
    assert [str(port) for port in balancer["ports"]] == [f"{SERVICE_PORT}:{SERVICE_PORT}"]
    assert balancer["depends_on"] == {REPLICAS: {"condition": "service_healthy"}}
    assert balancer["volumes"] == []


def test_the_scale_command_scales_the_single_app_to_zero() -> None:
    # The balancer publishes the app's host port, so the documented command leaves the app out.
    lines = [line for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("docker compose --profile scale")]
    assert lines
    for line in lines:
        assert f"--scale {APP}=0" in line and f"--scale {REPLICAS}=" in line, line


def test_the_scale_profile_adds_persistent_redis_and_postgresql(services: dict[str, Any]) -> None:
    redis, postgres = services["redis"], services["postgres"]
    assert redis["profiles"] == ["scale"] and postgres["profiles"] == ["scale"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"  # leases survive a restart
    for backend in (redis, postgres):
        assert "ports" not in backend  # reachable on the compose network only
        assert backend["healthcheck"]["test"][0] == "CMD"
        assert re.fullmatch(r"[a-z]+:\d+\.\d+(\.\d+)?-alpine", backend["image"]), backend["image"]
    # The replicas start once both answer, and without the profile they are not needed at all.
    for app in (services[APP], services[REPLICAS]):
        for name in ("redis", "postgres"):
            assert app["depends_on"][name] == {"condition": "service_healthy", "required": False}


def test_the_scale_profile_keeps_its_data_in_named_volumes() -> None:
    parsed = yaml.safe_load(COMPOSE.read_text())
    assert set(parsed["volumes"]) == {"redis-data", "postgres-data", "objects-data"}


def test_replicas_keep_outputs_in_the_profiles_bucket_not_a_shared_volume(
        services: dict[str, Any]) -> None:
    replicas, objects = services[REPLICAS], services["objects"]
    assert replicas["environment"]["OUTPUT_STORAGE"].startswith("${OUTPUT_STORAGE:-s3://")
    assert replicas["environment"]["AWS_ENDPOINT_URL"] == "${AWS_ENDPOINT_URL:-http://objects:9000}"
    # Each replica's /app/output is a volume of its own (its spool), never the host's ./output.
    assert {"type": "volume", "target": "/app/output"} in replicas["volumes"]
    assert not any(str(v).startswith("./output") for v in replicas["volumes"])
    assert replicas["depends_on"]["objects-bucket"] == {
        "condition": "service_completed_successfully", "required": False}
    assert objects["profiles"] == services["objects-bucket"]["profiles"] == ["scale"]
    assert "ports" not in objects and objects["healthcheck"]["test"][0] == "CMD"
    assert "mc mb --ignore-existing objects/outputs" in services["objects-bucket"]["command"][0]
