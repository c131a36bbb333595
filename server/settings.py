"""Gateway settings: environment variables (prefix ``SFPC_``), an optional config file, defaults.

Precedence, highest first: arguments given in code (``Settings(port=...)``, the ``sfpc serve``
flags), environment variables (``SFPC_PORT=9000``; lists and mappings as JSON:
``SFPC_MODEL_DIRS='["/models/ct"]'``, ``SFPC_API_KEYS='["k1"]'``), a ``.env`` file in the working
directory, the config file named by ``SFPC_CONFIG_FILE`` (JSON, TOML or YAML by extension, with
the same field names), then the defaults below. docs/server.md lists every field.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from sfpc.inference.options import parse_options
from sfpc.io.dicom_net import Destination, Route, check_routes

CONFIG_FILE_ENV = "SFPC_CONFIG_FILE"
LOOPBACK_NAMES = ("localhost",)



class Settings(BaseSettings):
    """Everything the gateway can be told; every field has a working default for a laptop."""

    model_config = SettingsConfigDict(env_prefix="SFPC_", env_file=".env", extra="ignore",
                                      validate_default=True)

    # -- network --------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address uvicorn binds. Anything but loopback "
                      "requires api_keys.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    workers: int = Field(1, ge=1, description="uvicorn worker processes; each loads the models.")
    root_path: str = Field("", description="Path prefix when served behind a reverse proxy.")

    # -- models ---------------------------------------------------------------------------
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Export directories (each with sfpc_model.json); every one is served.")
    default_model: str | None = Field(None, description="Name of the model used when a request "
                                      "names none; default: the first of model_dirs.")
    backend: Literal["onnxruntime", "triton"] = Field("onnxruntime", description="Inference "
                                                       "backend for every model.")
    onnx_providers: str = Field("auto", description="ONNX Runtime execution provider ('auto' "
                                "picks TensorRT > CUDA > CPU) or one provider name.")
    onnx_intra_op_threads: int | None = Field(None, ge=1, description="Threads per ONNX "
                                              "Runtime session (None: ONNX Runtime's default).")
    onnx_trt_cache_dir: str | None = Field(None, description="TensorRT execution provider: "
                                           "keep built engines here (a start then skips the "
                                           "minutes of engine building). onnxruntime-gpu only.")
    onnx_trt_fp16: bool = Field(False, description="TensorRT execution provider: FP16 engines.")
    triton_url: str | None = Field(None, description="Triton address, e.g. localhost:8001 "
                                   "(gRPC) or localhost:8000 (HTTP).")
    triton_protocol: Literal["grpc", "http"] = Field("grpc", description="Triton protocol.")
    triton_timeout_s: float = Field(60.0, gt=0, description="Seconds per Triton call.")
    triton_model_names: dict[str, str] = Field(default_factory=dict, description="Served model "
                                               "name -> Triton model name, when they differ.")
    sw_batch_size: int | None = Field(None, ge=1, description="Windows per backend call "
                                      "(None: the model's metadata).")

    # -- execution ------------------------------------------------------------------------
    concurrency: int = Field(1, ge=1, description="Segmentations running at once (thread "
                             "pool); further synchronous requests wait for a slot.")
    request_timeout_s: float = Field(300.0, gt=0, description="Synchronous segmentation "
                                     "deadline (504 after it), waiting for a slot included.")
    temp_dir: Path | None = Field(None, description="Where uploads are spooled (default: the "
                                  "system temp dir). Always cleaned up.")
    spool_memory_bytes: int = Field(8 << 20, ge=0, description="Uploads larger than this are "
                                    "spooled to temp_dir rather than held in memory.")

    # -- limits ---------------------------------------------------------------------------
    max_upload_bytes: int = Field(1 << 30, gt=0, description="Largest request body (413).")
    max_voxels: int = Field(1 << 28, gt=0, description="Largest decoded volume "
                            "(voxels x channels).")
    max_decompressed_bytes: int = Field(2 << 30, gt=0, description="Largest decompressed "
                                        "content (gzip, zip members).")
    max_compression_ratio: float = Field(250.0, gt=1, description="Largest uncompressed / "
                                         "compressed ratio of a zip member (zip bombs).")
    max_files: int = Field(10_000, gt=0, description="Most files in one request, or members "
                           "in an uploaded zip.")

    # -- security -------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Accepted keys (header X-API-Key or Authorization: "
        "Bearer). Empty: no auth, allowed on loopback only.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS; empty: CORS off.")

    # -- observability ----------------------------------------------------------------------
    log_level: str = Field("INFO", description="Python logging level name.")
    log_json: bool = Field(True, description="One JSON object per log line (else plain text).")

    # -- asynchronous jobs (server/jobs) ------------------------------------------------------
    data_dir: Path = Field(Path("sfpc-data"), description="Job database, uploads and results.")
    job_workers: int = Field(1, ge=1, description="Jobs running at once.")
    job_max_queued: int = Field(100, ge=1, description="Queued jobs before 503 + Retry-After.")
    job_retention_s: float = Field(24 * 3600.0, gt=0, description="Seconds results are kept.")
    job_max_attempts: int = Field(3, ge=1, description="Starts of a job before it is failed "
                                  "(a job that kills its worker is not retried forever).")
    jobs_backend: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="sqlite: jobs in data_dir, run by this gateway (one host). "
        "postgres: state in database_url, payloads in a data_dir every host mounts, run by "
        "`sfpc worker` processes (docs/deploy.md).")
    database_url: str | None = Field(None, description="postgres backend: libpq URL, e.g. "
                                     "postgresql://sfpc:secret@db:5432/sfpc.")
    webhook_secret: SecretStr | None = Field(None, description="Key of the HMAC-SHA256 "
                                             "signature of job webhooks (postgres backend).")
    webhook_retries: int = Field(5, ge=0, description="Webhook retries after a failed call.")
    webhook_backoff_s: int = Field(2, ge=1, description="Webhook retry n waits this to the "
                                   "power n seconds (2: 2, 4, 8, ...).")
    worker_heartbeat_s: float = Field(10.0, gt=0, description="sfpc worker heartbeat period.")
    worker_stalled_s: float = Field(30.0, gt=0, description="A worker silent this long is "
                                    "presumed dead and its running jobs are taken over.")
    worker_metrics_port: int | None = Field(
        None, ge=0, le=65535, description="sfpc worker: serve Prometheus metrics (its "
        "segmentation counters) on host:port; 0 picks a free port (logged). None: off.")
    worker_poll_s: float = Field(1.0, gt=0, description="Workers' poll period (queue, cancel "
                                 "checks, maintenance).")

    # -- DICOM push in (STOW-RS) and results out (server/routers/dicomweb.py) ---------------
    dicomweb_options: dict[str, Any] = Field(
        default_factory=dict, description="Segmentation options of the jobs POST /dicomweb/"
        "studies makes (as query parameters would give them, e.g. {\"outputs\": "
        "[\"seg_dicom\", \"sr_dicom\"]}); the request's query parameters win.")
    destinations: dict[str, Destination] = Field(
        default_factory=dict, description="Named places results go: {\"pacs\": {\"kind\": "
        "\"dicomweb\", \"url\": ..., \"username\": ...}} or {\"kind\": \"dimse\", "
        "\"host\", \"port\", \"ae_title\"}.")
    routes: list[Route] = Field(
        default_factory=list, description="Which destinations receive the DICOM results of "
        "STOW-RS jobs: [{\"model\": \"ct\" or \"*\", \"destinations\": [\"pacs\"]}], "
        "first match wins.")

    @model_validator(mode="after")
    def _known_destinations(self) -> Settings:
        check_routes(self.routes, self.destinations)
        parse_options(self.dicomweb_options)  # refused at start, not on the first push
        return self

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"):
            raise ValueError(f"log_level {value!r} is not a logging level name")
        return level

    @field_validator("cors_origins", "model_dirs", "api_keys", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # From the environment: a JSON list, or a plain comma-separated string (friendlier on a
        # command line).
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings, dotenv_settings]
        config = os.environ.get(CONFIG_FILE_ENV)
        if config:
            sources.append(_file_source(settings_cls, Path(config)))
        sources.append(file_secret_settings)
        return tuple(sources)

    # -- derived --------------------------------------------------------------------------
    @property
    def is_loopback(self) -> bool:
        """Whether ``host`` only accepts connections from this machine."""
        return is_loopback_host(self.host)

    def key_values(self) -> list[str]:
        """The configured API keys in clear (for comparison only)."""
        return [k.get_secret_value() for k in self.api_keys if k.get_secret_value()]

    def check_startable(self) -> None:
        """Refuse configurations that must not serve: a network-facing server without keys."""
        if not self.is_loopback and not self.key_values():
            raise ValueError(
                f"refusing to listen on {self.host!r} without API keys: anything but loopback "
                "(127.0.0.1, ::1, localhost) exposes patient data to the network. Set "
                "SFPC_API_KEYS='[\"a-long-random-key\"]' (or --api-key), or bind 127.0.0.1"
            )


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; False for 0.0.0.0, :: and any other name."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise FileNotFoundError(f"{CONFIG_FILE_ENV}={path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    raise ValueError(f"{CONFIG_FILE_ENV}={path}: use a .json, .toml, .yaml or .yml file")


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from the environment and ``config_file`` (or ``SFPC_CONFIG_FILE``), with
    ``overrides`` (None values ignored) taking precedence."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if config_file is None:
        return Settings(**given)
    previous = os.environ.get(CONFIG_FILE_ENV)
    os.environ[CONFIG_FILE_ENV] = str(config_file)
    try:
        return Settings(**given)
    finally:
        if previous is None:
            os.environ.pop(CONFIG_FILE_ENV, None)
        else:
            os.environ[CONFIG_FILE_ENV] = previous
