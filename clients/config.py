"""Client configuration: where the gateway and the PACS are, and the credentials for both.

Sources, highest precedence first: command-line flags, environment variables, the config file
(``--config`` or ``SFPC_CLIENT_CONFIG``; JSON, YAML or TOML by extension), defaults. Secrets
(API key, PACS password or token) may also come from a file named by ``<VARIABLE>_FILE`` (e.g.
``SFPC_PACS_PASSWORD_FILE``, which suits systemd credentials and Docker secrets), so they never
have to appear on a command line or in the process list.

Config file layout::

    gateway:
      url: http://127.0.0.1:8000
      api_key: ...            # or SFPC_API_KEY / SFPC_API_KEY_FILE
      timeout_s: 300
    pacs:
      url: https://pacs.example.org/dicom-web
      username: sfpc          # HTTP basic auth; or token: ... (Bearer)
      password: ...
      verify: true            # or a CA bundle path
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

CONFIG_ENV = "SFPC_CLIENT_CONFIG"


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field("http://127.0.0.1:8000", description="Base URL of the SFPC gateway.")
    api_key: SecretStr | None = Field(None, description="Sent as X-API-Key.")
    timeout_s: float = Field(300.0, gt=0, description="Seconds to wait for an answer.")
    connect_timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(5, ge=1, description="Tries per request (1 = no retry).")
    verify: bool | str = Field(True, description="TLS verification, or a CA bundle path.")


class PacsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="DICOMweb base URL (e.g. Orthanc's "
                            "http://host:8042/dicom-web).")
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = Field(None, description="Bearer token (instead of user/password).")
    qido_prefix: str | None = None
    wado_prefix: str | None = None
    stow_prefix: str | None = None
    verify: bool | str = True
    timeout_s: float = Field(300.0, gt=0)


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    pacs: PacsConfig = Field(default_factory=PacsConfig)


# Environment variable -> (section, field).
ENV_VARIABLES: dict[str, tuple[str, str]] = {
    "SFPC_SERVER_URL": ("gateway", "url"),
    "SFPC_API_KEY": ("gateway", "api_key"),
    "SFPC_CLIENT_TIMEOUT_S": ("gateway", "timeout_s"),
    "SFPC_CLIENT_RETRIES": ("gateway", "retries"),
    "SFPC_CLIENT_VERIFY": ("gateway", "verify"),
    "SFPC_PACS_URL": ("pacs", "url"),
    "SFPC_PACS_USERNAME": ("pacs", "username"),
    "SFPC_PACS_PASSWORD": ("pacs", "password"),
    "SFPC_PACS_TOKEN": ("pacs", "token"),
    "SFPC_PACS_QIDO_PREFIX": ("pacs", "qido_prefix"),
    "SFPC_PACS_WADO_PREFIX": ("pacs", "wado_prefix"),
    "SFPC_PACS_STOW_PREFIX": ("pacs", "stow_prefix"),
    "SFPC_PACS_VERIFY": ("pacs", "verify"),
    "SFPC_PACS_TIMEOUT_S": ("pacs", "timeout_s"),
}
_SECRETS = frozenset({"SFPC_API_KEY", "SFPC_PACS_PASSWORD", "SFPC_PACS_TOKEN"})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a JSON, YAML or TOML file."""
    path = Path(path)
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(text)
    elif suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib

            data = tomllib.loads(text)
        else:
            raise ValueError(f"config file {path}: TOML needs Python 3.11; use JSON or YAML")
    else:
        raise ValueError(f"config file {path}: use .json, .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} does not hold a mapping")
    return data


def _env_value(name: str, env: Mapping[str, str]) -> str | None:
    if env.get(name):
        return env[name]
    if name in _SECRETS and env.get(f"{name}_FILE"):
        return Path(env[f"{name}_FILE"]).read_text().strip()
    return None


def _verify(value: str) -> bool | str:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    return value  # a CA bundle path


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None,
                gateway: Mapping[str, Any] | None = None,
                pacs: Mapping[str, Any] | None = None) -> ClientConfig:
    """The configuration from ``path`` (or ``$SFPC_CLIENT_CONFIG``), the environment, and the
    overrides ``gateway`` / ``pacs`` (None values ignored), in rising precedence."""
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV) or None
    data: dict[str, dict[str, Any]] = {"gateway": {}, "pacs": {}}
    if path:
        for section, values in read_config_file(path).items():
            if section not in data or not isinstance(values, dict):
                raise ValueError(f"config file {path}: unknown section {section!r}; use "
                                 "'gateway' and 'pacs'")
            data[section].update(values)
    for name, (section, key) in ENV_VARIABLES.items():
        value = _env_value(name, env)
        if value is not None:
            data[section][key] = _verify(value) if key == "verify" else value
    for section, values in (("gateway", gateway), ("pacs", pacs)):
        data[section].update({k: v for k, v in (values or {}).items() if v is not None})
    return ClientConfig.model_validate(data)


def gateway_client(config: GatewayConfig, *, asynchronous: bool = False) -> Any:
    """An :class:`~sfpc.clients.http.SFPCClient` (or the asyncio one) for ``config``."""
    from sfpc.clients.http import AsyncSFPCClient, RetryPolicy, SFPCClient

    cls = AsyncSFPCClient if asynchronous else SFPCClient
    return cls(config.url, api_key=config.api_key.get_secret_value() if config.api_key else None,
               timeout=config.timeout_s, connect_timeout=config.connect_timeout_s,
               retry=RetryPolicy(attempts=config.retries), verify=config.verify)


__all__ = ["CONFIG_ENV", "ClientConfig", "ENV_VARIABLES", "GatewayConfig", "PacsConfig",
           "gateway_client", "load_config", "read_config_file"]
