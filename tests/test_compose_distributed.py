"""compose.distributed.yaml (the distributed-jobs override of compose.yaml) against the code it
configures, without Docker: every SFPC_* variable is a real setting and validates, both
gateways and both workers share one data volume and reach PostgreSQL by its service name, and
the workers run `sfpc worker`."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from sfpc.cli import COMMANDS
from sfpc.server.settings import Settings
from tests.test_deploy_files import interpolate, settings_variable_names

ROOT = Path(__file__).resolve().parents[1]
OVERRIDE = ROOT / "compose.distributed.yaml"
ENV = {"SFPC_API_KEYS": "k" * 32, "SFPC_DB_PASSWORD": "pw", "SFPC_WEBHOOK_SECRET": "s"}


def override(env: dict[str, str] | None = None) -> dict[str, Any]:
    return yaml.safe_load(interpolate(OVERRIDE.read_text(encoding="utf-8"),
                                      ENV if env is None else env))


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in service["environment"].items()}


def test_two_gateways_two_workers_one_database_one_volume() -> None:
    services = override()["services"]
    workers = [s for s in services.values() if s.get("entrypoint", [None])[-1] == "worker"]
    assert len(workers) == 2
    assert all(w["entrypoint"] == ["sfpc", "worker"] and "worker" in COMMANDS for w in workers)
    gateways = [services["gateway"], services["gateway-b"]]
    assert services["gateway-b"]["ports"] == ["8001:8000"]
    for service in [*gateways, *workers]:
        env = _env(service)
        assert env["SFPC_JOBS_BACKEND"] == "postgres"
        assert urlsplit(env["SFPC_DATABASE_URL"]).hostname == "postgres"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    for service in [services["gateway-b"], *workers]:
        env = _env(service)
        assert f"sfpc-data:{env['SFPC_DATA_DIR']}" in service["volumes"]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]


def test_every_variable_is_a_setting_and_validates(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    services = override()["services"]
    names = settings_variable_names()
    for name in ("gateway", "gateway-b", "worker-a", "worker-b"):
        env = _env(services[name])
        assert set(env) - names == set(), f"{name} sets variables Settings ignores"
        for key in list(env):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.jobs_backend == "postgres" and settings.database_url
        for key in env:
            monkeypatch.delenv(key)


def test_passwords_are_required() -> None:
    with pytest.raises(KeyError, match="SFPC_DB_PASSWORD"):
        override({"SFPC_API_KEYS": "k" * 32})
