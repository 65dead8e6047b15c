"""compose.yaml, checked the way `docker compose config` would not be here (no Docker engine
on CI): it parses, pins every image, health-checks every long-running service, and runs one
service per consumer stage that can be scaled (no container name, no host port)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from consumers.registry import STAGES

COMPOSE = Path(__file__).resolve().parents[1] / "compose.yaml"


def _services() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, Any] = document["services"]
    return services


def test_every_stage_has_a_scalable_health_checked_service() -> None:
    services = _services()
    for stage in STAGES:
        service = services[stage]
        assert service["command"] == ["consume", stage]
        assert "healthcheck" in service, f"{stage} has no health check"
        assert "container_name" not in service and "ports" not in service, stage
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_images_are_pinned_and_long_running_services_health_checked() -> None:
    for name, service in _services().items():
        image = service.get("image", "")
        if image.startswith("omniroute:"):
            assert "build" in service, name  # our own image, built from the Dockerfile
            continue
        tag = image.rpartition(":")[2]
        assert tag and tag != "latest" and any(c.isdigit() for c in tag), f"{name}: {image}"
    long_running = {n: s for n, s in _services().items() if s.get("restart") != "no"}
    for name, service in long_running.items():
        assert "healthcheck" in service, f"{name} has no health check"


def test_the_router_is_the_only_service_with_a_host_port() -> None:
    published = {n for n, s in _services().items() if s.get("ports")}
    assert published <= {"router", "rabbitmq", "postgres"}
    assert "router" in published


def test_the_router_gets_the_admin_token_and_the_shared_settings() -> None:
    services = _services()
    router = services["router"]["environment"]
    assert router["OMNIROUTE_ADMIN_TOKEN"] == "${OMNIROUTE_ADMIN_TOKEN:-}"
    # The router's own environment extends the shared one instead of replacing it.
    assert router.items() >= services["classify"]["environment"].items()
    assert "OMNIROUTE_ADMIN_TOKEN" not in services["classify"]["environment"]
