"""docker-compose.yml's shape (no Docker engine here): gunicorn sits behind the nginx proxy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # (no types-PyYAML in requirements-dev)

from servers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
APP = "replicate-generation"
PROXY = "proxy"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    parsed = yaml.safe_load(COMPOSE.read_text())
    return dict(parsed["services"])


def _mount(service: dict[str, Any], target: str) -> tuple[Path, str]:
    """The host path and options of the bind mount onto `target`."""
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        destination, _, options = rest.partition(":")
        if destination == target:
            return ROOT / source, options
    raise AssertionError(f"nothing is mounted on {target}")


def test_gunicorn_is_not_published_on_the_host(services: dict[str, Any]) -> None:
    app = services[APP]
    assert "ports" not in app
    assert [str(port) for port in app["expose"]] == ["5003"]


def test_the_proxy_publishes_the_service_port(services: dict[str, Any]) -> None:
    proxy = services[PROXY]
    (published,) = [str(port) for port in proxy["ports"]]
    host, _, container = published.rpartition(":")
    config = (ROOT / "deploy" / "nginx.conf").read_text()
    assert host == "5003" and re.search(rf"^\s*listen {container};", config, re.M)
    # The upstream nginx proxies to is the app's service name and exposed port.
    assert f"set $service {APP}:5003;" in config


def test_the_proxy_runs_the_repository_config_read_only(services: dict[str, Any]) -> None:
    source, options = _mount(services[PROXY], "/etc/nginx/nginx.conf")
    assert source == ROOT / "deploy" / "nginx.conf" and source.is_file()
    assert options == "ro"


def test_the_proxy_image_is_pinned_and_health_checked(services: dict[str, Any]) -> None:
    proxy = services[PROXY]
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+(-[a-z0-9.]+)?", proxy["image"]), proxy["image"]
    assert proxy["healthcheck"]["test"][0] == "CMD"
    assert proxy["depends_on"] == {APP: {"condition": "service_healthy"}}
    assert "healthcheck" in services[APP]


def test_the_scale_profile_adds_persistent_redis_and_postgresql(services: dict[str, Any]) -> None:
    redis, postgres, app = services["redis"], services["postgres"], services[APP]
    assert redis["profiles"] == ["scale"] and postgres["profiles"] == ["scale"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"  # leases survive a restart
    for backend in (redis, postgres):
        assert "ports" not in backend  # reachable on the compose network only
        assert backend["healthcheck"]["test"][0] == "CMD"
        assert re.fullmatch(r"[a-z]+:\d+\.\d+(\.\d+)?-alpine", backend["image"]), backend["image"]
    # The replicas start once both answer, and without the profile they are not needed at all.
    for name in ("redis", "postgres"):
        assert app["depends_on"][name] == {"condition": "service_healthy", "required": False}


def test_the_scale_profile_keeps_its_data_in_named_volumes() -> None:
    parsed = yaml.safe_load(COMPOSE.read_text())
    assert set(parsed["volumes"]) == {"redis-data", "postgres-data"}
