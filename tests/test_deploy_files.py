"""The deployment files (Dockerfile, .dockerignore, compose.yaml, docs/deploy.md) against the code
they configure, without Docker: every SFPC_* variable they set is a real setting, the compose
environment validates as Settings, the Triton model names are the ones the repository writer
produces, the image's entry point is the package's console script, no torch gets in, and the
embedded default model ships in the wheel."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from sfpc.server.settings import CONFIG_FILE_ENV, Settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "compose.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
PYPROJECT = ROOT / "pyproject.toml"

TRITON_MODELS_DIR = "/models"  # where compose mounts the repository in both containers
TRITON_PORTS = {"http": 8000, "grpc": 8001}  # tritonserver's defaults inside its container
TEST_KEY = "test-key-not-a-secret-0123456789"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} (Compose interpolation)
_INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?)([-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution, for the forms compose.yaml uses."""

    def one(match: re.Match[str]) -> str:
        name, colon, kind, arg = match.groups()
        value = env.get(name)
        unset = value is None or (colon == ":" and value == "")
        if kind == "-" and unset:
            return arg
        if kind == "?" and unset:
            raise KeyError(f"{name} is required: {arg}")
        return value or ""

    return _INTERPOLATION.sub(one, text)


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """compose.yaml after interpolation with ``env`` (default: just an API key)."""
    values = {"SFPC_API_KEYS": TEST_KEY} if env is None else env
    return yaml.safe_load(interpolate(COMPOSE.read_text(encoding="utf-8"), values))


def gateway_environment(config: dict[str, Any]) -> dict[str, str]:
    env = config["services"]["gateway"]["environment"]
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            for name, value in re.findall(r"(\w+)=(\S*)", args):
                env[name] = value
    return env


def settings_variable_names() -> set[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    return {prefix.upper() + name.upper() for name in Settings.model_fields} | {CONFIG_FILE_ENV}


def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


# -- compose.yaml -----------------------------------------------------------------------------
def test_compose_runs_the_gateway_after_a_ready_triton() -> None:
    config = compose()
    triton, gateway = config["services"]["triton"], config["services"]["gateway"]
    command = triton["command"]
    command = command if isinstance(command, list) else command.split()
    assert command[0] == "tritonserver"
    assert f"--model-repository={TRITON_MODELS_DIR}" in command
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert any("/v2/health/ready" in part for part in triton["healthcheck"]["test"])
    assert gateway["depends_on"]["triton"]["condition"] == "service_healthy"
    assert gateway["build"]["dockerfile"] == DOCKERFILE.name
    # The gateway's container port is the port it is told to listen on.
    env = gateway_environment(config)
    published = [str(p).rsplit(":", 1)[-1] for p in gateway["ports"]]
    assert env["SFPC_PORT"] in published


def test_compose_requires_an_api_key() -> None:
    # The gateway listens on 0.0.0.0 in its container and refuses to start without a key.
    with pytest.raises(KeyError, match="SFPC_API_KEYS"):
        compose({})


def test_gateway_variables_are_settings() -> None:
    names = settings_variable_names()
    compose_names = set(gateway_environment(compose()))
    image_names = {n for n in dockerfile_env() if n.startswith("SFPC_")}
    assert compose_names - names == set(), "compose.yaml sets variables Settings ignores"
    assert image_names - names == set(), "the Dockerfile sets variables Settings ignores"


def test_compose_environment_validates_as_triton_settings(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    config = compose()
    for name in list(os.environ):
        if name.startswith("SFPC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env file
    for name, value in gateway_environment(config).items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.backend == "triton"
    assert settings.key_values() == [TEST_KEY]
    settings.check_startable()  # not loopback, but it has a key

    host, port = settings.triton_url.rsplit(":", 1)
    assert host == "triton", "the gateway must reach Triton by its compose service name"
    assert int(port) == TRITON_PORTS[settings.triton_protocol]

    # The gateway reads each model's metadata from the same repository Triton serves.
    def source_of(service: str, target: str) -> str:
        for volume in config["services"][service]["volumes"]:
            if isinstance(volume, dict) and volume["target"] == target:
                return volume["source"]
            if isinstance(volume, str) and volume.split(":")[1] == target:
                return volume.split(":")[0]
        raise AssertionError(f"{service} mounts nothing at {target}")

    assert source_of("gateway", TRITON_MODELS_DIR) == source_of("triton", TRITON_MODELS_DIR)
    assert [str(d.parent) for d in settings.model_dirs] == [TRITON_MODELS_DIR]


# -- Triton model names ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from tests.support.models import export_fixture_model

    out, _ = export_fixture_model(tmp_path_factory.mktemp("deploy") / "export", spatial_dims=2,
                                  patch_size=(16, 16))
    return out


def test_triton_names_match_the_repository_writer(exported: Path, tmp_path: Path) -> None:
    from sfpc.inference.contract import METADATA_FILE
    from sfpc.model.triton_repo import main as write_repo

    repo = tmp_path / "triton_repo"
    served = Path(gateway_environment(compose())["SFPC_MODEL_DIRS"]).name
    # The writer names the Triton models after the export's own model name by default, which
    # is the name the gateway asks Triton for: compose serves a model exported as `served`.
    assert write_repo([str(exported), str(repo), "--name", served]) == 0
    generated = {p.parent.name for p in repo.glob("*/config.pbtxt")}
    assert served in generated and f"{served}_uncertainty" in generated
    assert (repo / served / METADATA_FILE).is_file()  # what the gateway loads
    by_default = tmp_path / "by_default"
    assert write_repo([str(exported), str(by_default)]) == 0
    own = json.loads((exported / METADATA_FILE).read_text())["name"]
    assert {p.parent.name for p in by_default.glob("*/config.pbtxt")} == {
        own, f"{own}_uncertainty"}

    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    named = set(re.findall(r"/v2/models/([\w.-]+)/", doc))
    assert named and named <= generated, f"docs/deploy.md names {named - generated}"
    # The gateway asks Triton for the model's own name: every documented export command that
    # writes a repository must name the model like the folder compose serves.
    blocks = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", doc, flags=re.DOTALL))
    joined = re.sub(r"\\\n\s*", " ", blocks)
    exports = [line for line in joined.splitlines()
               if "sfpc export" in line and "--triton-repo" in line]
    assert exports and all(f"--name {served}" in line for line in exports), exports


# -- Dockerfile and .dockerignore ----------------------------------------------------------------
def test_entrypoint_is_the_console_script_serve() -> None:
    from sfpc.cli import COMMANDS

    entry = [args for instruction, args in dockerfile_instructions()
             if instruction == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0])  # exec form: signals reach uvicorn, not a shell
    scripts = pyproject()["project"]["scripts"]
    assert argv[0] in scripts
    assert scripts[argv[0]] == "sfpc.cli:main"
    assert argv[1] in COMMANDS and argv[1] == "serve"


def test_image_never_installs_torch() -> None:
    base = pyproject()["project"]["dependencies"]
    assert not [d for d in base if re.match(r"(torch|onnx)\b(?!runtime)", d)], base
    runs = [args for instruction, args in dockerfile_instructions() if instruction == "RUN"]
    installs = [step for args in runs for step in args.split("&&") if "pip install" in step]
    assert installs
    for step in installs:
        assert "torch" not in step
        assert not re.search(r"\[(train|dev)", step), step
        assert not re.search(r"\s\.\[", step), "extras of the package itself"
    # The dependency layer reads only [project].dependencies, never optional-dependencies.
    assert any("['project']['dependencies']" in args for args in runs)
    assert "optional-dependencies" not in DOCKERFILE.read_text(encoding="utf-8")


def test_image_runs_unprivileged_with_a_healthcheck() -> None:
    instructions = dockerfile_instructions()
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = [args for instruction, args in instructions if instruction == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0]
    env = dockerfile_env()
    assert env["SFPC_HOST"] == "0.0.0.0"
    exposed = [args for instruction, args in instructions if instruction == "EXPOSE"]
    assert exposed == [env["SFPC_PORT"]]


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex + r"\Z")))
    return rules


def docker_excludes(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last rule matching the path
    or one of its parent folders decides (moby's patternmatcher)."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negate, regex in _dockerignore_rules():
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("path", [
    ".venv", ".venv/bin/python", ".venv-triton/lib/x.py", "runs/demo/export/seg.onnx",
    "data/case.nii.gz", ".git/HEAD", "sfpc-data/jobs.sqlite", "triton_repo/sfpc/1/model.onnx",
    "server/__pycache__/app.cpython-312.pyc", "tests/test_deploy_files.py",
    "sfpc_seg.egg-info/PKG-INFO", ".pytest_cache/v/cache", "server/runs/x", "model/data/x",
])
def test_dockerignore_keeps_local_state_out(path: str) -> None:
    assert docker_excludes(path)


def package_folders() -> set[str]:
    """sfpc/ and the top-level folders its links point at (model/, server/, ...)."""
    links = {p.readlink().name for p in (ROOT / "sfpc").iterdir() if p.is_symlink()}
    return {"sfpc"} | links


def test_dockerfile_copies_every_package_folder() -> None:
    copied = {args.split()[0].strip("./") for instruction, args in dockerfile_instructions()
              if instruction == "COPY" and not args.startswith("--from")}
    folders = package_folders()
    assert {"model", "server", "training", "clients"} <= folders
    assert folders <= copied, f"setuptools needs {folders - copied} to build the wheel"
    for needed in sorted(folders | {"pyproject.toml", "README.md"}):
        assert not docker_excludes(needed), needed
    for source in ("server/app.py", "sfpc/default_model/sfpc_model.json", "model/export.py"):
        assert not docker_excludes(source), source


# -- the embedded default model ------------------------------------------------------------------
def test_wheel_ships_the_default_model(exported: Path, tmp_path: Path) -> None:
    """setuptools itself builds the wheel from a copy of the sources with a model in
    sfpc/default_model/; the wheel must hold it where `sfpc serve` looks for it."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 (pyproject's build requirement)")
    from sfpc.server.cli import DEFAULT_MODEL_DIR

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "default_model")
    for folder in package_folders():
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore, symlinks=True)
    model_dir = src / "sfpc" / DEFAULT_MODEL_DIR.name
    shutil.copytree(exported, model_dir)
    dist = tmp_path / "dist"
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                          "--no-build-isolation", "--quiet", "--wheel-dir", str(dist), str(src)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = dist.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # Package data of sfpc; the linked folders are in the wheel as sfpc's subpackages.
    expected = {f"sfpc/{DEFAULT_MODEL_DIR.name}/{p.name}" for p in model_dir.iterdir()}
    expected |= {"sfpc/server/app.py", "sfpc/model/export.py", "sfpc/io/upload.py",
                 "sfpc/inference/engine.py", "sfpc/clients/http.py", "sfpc/training/trainer.py"}
    assert expected <= names, sorted(expected - names)
