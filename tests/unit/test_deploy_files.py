"""Offline checks of the deployment files: example configs, Dockerfile, compose, Kubernetes.

No Docker engine runs here, so the image is never built. These tests check what needs no
engine. Every example config passes `appliance check-config`. The Kubernetes manifests
carry the fields their kinds require and agree with each other. compose.yaml passes
`docker-compose config`. The image's ENTRYPOINT and CMD run as a plain process.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.appliance import free_port, wait_for_port
from tests.support.certs import TestPKI

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"
KUBERNETES = EXAMPLES / "kubernetes"
COMPOSE_CONFIG = EXAMPLES / "compose" / "appliance" / "appliance.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
EXAMPLE_CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
COMMAND_TIMEOUT = 60


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def pem_files(pki: TestPKI) -> dict[str, Path]:
    """Test PEM files by the config key that names such a file."""
    cert = pki.issue_server_cert("example")
    return {
        "cert_file": cert.cert_file,
        "key_file": cert.key_file,
        "client_cert_file": cert.cert_file,
        "client_key_file": cert.key_file,
        "ca_file": pki.ca_file,
    }


def clean_env(**extra: str) -> dict[str, str]:
    """Return this environment without APPLIANCE_ variables, able to import the package."""
    env = {
        k: v for k, v in os.environ.items() if not k.upper().startswith("APPLIANCE_")
    }
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])
    )
    env.update(extra)
    return env


def file_overrides(
    config: dict[str, Any], pem_files: dict[str, Path]
) -> dict[str, str]:
    """Return env variables that point every *_file of the config at test PEM files.

    The examples name the paths they have in a deployment (/etc/appliance/tls/...), which
    do not exist here, and validation checks that each file is readable.
    """
    overrides = {}
    for section in ("listeners", "upstreams"):
        for name, entry in (config.get(section) or {}).items():
            for key in entry:
                if key in pem_files:
                    variable = f"APPLIANCE_{section}__{name}__{key}".upper()
                    overrides[variable] = str(pem_files[key])
    return overrides


def check_config(
    path: Path, pem_files: dict[str, Path]
) -> subprocess.CompletedProcess[str]:
    config = yaml.safe_load(path.read_text())
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "check-config", "--config", str(path)],
        cwd=REPO_ROOT,
        env=clean_env(**file_overrides(config, pem_files)),
        capture_output=True,
        check=False,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )


# Example configs


def test_examples_folder_has_configs() -> None:
    names = {path.name for path in EXAMPLE_CONFIGS}
    assert {"quickstart.yaml", "strict-tls.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda path: path.name)
def test_example_passes_check_config(path: Path, pem_files: dict[str, Path]) -> None:
    result = check_config(path, pem_files)
    assert result.returncode == 0, result.stderr


def test_compose_config_passes_check_config(pem_files: dict[str, Path]) -> None:
    result = check_config(COMPOSE_CONFIG, pem_files)
    assert result.returncode == 0, result.stderr


def test_configmap_config_passes_check_config(
    pem_files: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "appliance.yaml"
    path.write_text(configmap_config_text())
    result = check_config(path, pem_files)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "path", [*EXAMPLE_CONFIGS, COMPOSE_CONFIG], ids=lambda path: path.name
)
def test_example_names_schema(path: Path) -> None:
    first_line = path.read_text().splitlines()[0]
    schema = (path.parent / first_line.partition("$schema=")[2]).resolve()
    assert first_line.startswith("# yaml-language-server: $schema=")
    assert schema == REPO_ROOT / "schemas" / "appliance.schema.json"


# Kubernetes manifests


def load_manifests() -> dict[str, list[dict[str, Any]]]:
    manifests = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        manifests[path.name] = documents
    return manifests


def manifest_of_kind(kind: str) -> dict[str, Any]:
    found = [d for docs in load_manifests().values() for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def configmap_config_text() -> str:
    return manifest_of_kind("ConfigMap")["data"]["appliance.yaml"]


def appliance_container() -> dict[str, Any]:
    containers = manifest_of_kind("Deployment")["spec"]["template"]["spec"][
        "containers"
    ]
    return next(c for c in containers if c["name"] == "appliance")


@pytest.mark.parametrize("name", sorted(load_manifests()))
def test_manifest_has_common_fields(name: str) -> None:
    for document in load_manifests()[name]:
        assert isinstance(document.get("apiVersion"), str)
        assert isinstance(document.get("kind"), str)
        if document["kind"] != "Kustomization":
            assert document["metadata"]["name"]


def test_deployment_required_fields() -> None:
    deployment = manifest_of_kind("Deployment")
    spec = deployment["spec"]
    template_labels = spec["template"]["metadata"]["labels"]
    assert deployment["apiVersion"] == "apps/v1"
    assert spec["selector"]["matchLabels"].items() <= template_labels.items()
    for container in spec["template"]["spec"]["containers"]:
        assert container["name"]
        assert container["image"]


def test_deployment_mounts_defined_volumes() -> None:
    pod = manifest_of_kind("Deployment")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = appliance_container()["volumeMounts"]
    for mount in mounts:
        assert mount["name"] in volumes
        assert "subPath" not in mount, "subPath mounts never receive updates"
    configmap = volumes["config"]["configMap"]["name"]
    assert configmap == manifest_of_kind("ConfigMap")["metadata"]["name"]


def test_deployment_config_path_in_configmap() -> None:
    container = appliance_container()
    env = {item["name"]: item.get("value") for item in container["env"]}
    config_path = Path(env["APPLIANCE_CONFIG"])
    mounts = {Path(m["mountPath"]): m["name"] for m in container["volumeMounts"]}
    assert mounts[config_path.parent] == "config"
    assert config_path.name in manifest_of_kind("ConfigMap")["data"]


def test_probes_use_admin_listener() -> None:
    container = appliance_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    config = yaml.safe_load(configmap_config_text())
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    assert ports[readiness["port"]] == config["admin"]["port"]
    assert ports[liveness["port"]] == config["admin"]["port"]
    assert config["admin"]["enabled"] is True
    assert config["admin"]["bind"] == "0.0.0.0"


def test_container_ports_match_listeners() -> None:
    ports = {port["containerPort"] for port in appliance_container()["ports"]}
    config = yaml.safe_load(configmap_config_text())
    listener_ports = {listener["port"] for listener in config["listeners"].values()}
    assert listener_ports <= ports


def test_certificates_come_from_secret() -> None:
    container = appliance_container()
    pod = manifest_of_kind("Deployment")["spec"]["template"]["spec"]
    secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
    secret_paths = [
        Path(m["mountPath"])
        for m in container["volumeMounts"]
        if m["name"] in secret_volumes
    ]
    config = yaml.safe_load(configmap_config_text())
    for listener in config["listeners"].values():
        for key in ("cert_file", "key_file"):
            assert Path(listener[key]).parent in secret_paths


def test_configmap_pins_every_upstream() -> None:
    config = yaml.safe_load(configmap_config_text())
    pinned = {entry["host"] for entry in config["known_servers"]}
    hosts = {upstream["host"] for upstream in config["upstreams"].values()}
    assert hosts <= pinned


def test_service_targets_container_ports() -> None:
    service = manifest_of_kind("Service")
    pod_labels = manifest_of_kind("Deployment")["spec"]["template"]["metadata"][
        "labels"
    ]
    port_names = {port["name"] for port in appliance_container()["ports"]}
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"]
    for port in service["spec"]["ports"]:
        assert isinstance(port["port"], int)
        assert port["targetPort"] in port_names


def test_kustomization_lists_all_manifests() -> None:
    kustomization = manifest_of_kind("Kustomization")
    others = {name for name in load_manifests() if name != "kustomization.yaml"}
    assert set(kustomization["resources"]) == others


# compose.yaml


def load_compose() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())


def test_compose_passes_docker_compose_config() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    result = subprocess.run(
        [binary, "-f", "compose.yaml", "config", "-q"],
        cwd=REPO_ROOT,
        env=clean_env(),
        capture_output=True,
        check=False,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr


def test_compose_build_contexts_exist() -> None:
    for name, service in load_compose()["services"].items():
        context = REPO_ROOT / service["build"]
        assert (context / "Dockerfile").is_file(), name


def test_compose_mounts_config_and_state() -> None:
    compose = load_compose()
    volumes = compose["services"]["appliance"]["volumes"]
    targets = {entry.split(":")[1]: entry.split(":")[0] for entry in volumes}
    assert (REPO_ROOT / targets["/etc/appliance"] / "appliance.yaml") == COMPOSE_CONFIG
    assert targets["/var/lib/appliance"] in compose["volumes"]


def test_compose_publishes_admin_port() -> None:
    ports = load_compose()["services"]["appliance"]["ports"]
    admin_port = yaml.safe_load(COMPOSE_CONFIG.read_text())["admin"]["port"]
    assert f"127.0.0.1:{admin_port}:{admin_port}" in ports


# Dockerfile


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, with continuation lines joined."""
    instructions = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, arguments = text.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def instruction_values(keyword: str) -> list[str]:
    return [args for name, args in dockerfile_instructions() if name == keyword]


def test_dockerfile_is_multi_stage() -> None:
    stages = instruction_values("FROM")
    args = dict(a.split("=", 1) for a in instruction_values("ARG") if "=" in a)
    base = args["PYTHON_IMAGE"]
    assert len(stages) >= 2
    assert base.startswith(("python:3.11-slim", "python:3.12-slim"))


def test_dockerfile_runs_as_non_root() -> None:
    users = instruction_values("USER")
    assert users
    assert users[-1].split(":")[0] not in ("0", "root")


def test_dockerfile_declares_runtime_contract() -> None:
    assert instruction_values("VOLUME") == ['["/var/lib/appliance"]']
    assert instruction_values("STOPSIGNAL") == ["SIGTERM"]
    assert json.loads(instruction_values("ENTRYPOINT")[-1]) == ["appliance"]
    assert json.loads(instruction_values("CMD")[-1]) == ["run"]
    assert (
        "APPLIANCE_CONFIG=/etc/appliance/appliance.yaml"
        in instruction_values("ENV")[-1]
    )


def test_dockerfile_healthcheck_runs_healthcheck() -> None:
    healthcheck = instruction_values("HEALTHCHECK")[-1]
    command = healthcheck.partition("CMD ")[2]
    assert json.loads(command) == ["appliance", "healthcheck"]


def test_dockerfile_installs_uvloop_extra() -> None:
    runs = " ".join(instruction_values("RUN"))
    assert '"appliance[fast]"' in runs
    assert "pip wheel" in runs


def test_dockerfile_exposes_example_ports() -> None:
    exposed = {
        int(port) for value in instruction_values("EXPOSE") for port in value.split()
    }
    compose = yaml.safe_load(COMPOSE_CONFIG.read_text())
    kubernetes = yaml.safe_load(configmap_config_text())
    for config in (compose, kubernetes):
        assert {entry["port"] for entry in config["listeners"].values()} <= exposed
        assert config["admin"]["port"] in exposed


def test_dockerfile_copy_sources_exist() -> None:
    for arguments in instruction_values("COPY"):
        words = [w for w in shlex.split(arguments) if not w.startswith("--")]
        if "--from" in arguments:
            continue
        for source in words[:-1]:
            assert (REPO_ROOT / source).exists(), source


def test_entrypoint_is_console_script() -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "scripts"
    ]
    entrypoint = json.loads(instruction_values("ENTRYPOINT")[-1])
    assert scripts[entrypoint[0]] == "appliance.cli:main"


# The image's command, run outside a container


def image_command(arguments: list[str]) -> list[str]:
    """Return the image's `appliance ...` command as this interpreter runs it."""
    return [sys.executable, "-m", "appliance.cli", *arguments]


def image_env(**overrides: str) -> dict[str, str]:
    """Return the environment the image sets, with `overrides` on top."""
    env = clean_env(PYTHONUNBUFFERED="1")
    for value in instruction_values("ENV"):
        for pair in shlex.split(value):
            name, _, setting = pair.partition("=")
            env[name] = setting
    env.update(overrides)
    return env


def entrypoint_config(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    config = {
        "listeners": {
            "imap": {"protocol": "imap", "port": free_port(), "upstream": "mail"}
        },
        # No mail server is needed: the test never logs in.
        "upstreams": {
            "mail": {"host": "127.0.0.1", "port": free_port(), "tls": "starttls"}
        },
        "admin": {"enabled": True, "port": free_port()},
        "state_dir": str(tmp_path / "state"),
    }
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def test_image_command_runs_with_config_override(tmp_path: Path) -> None:
    path, config = entrypoint_config(tmp_path)
    entrypoint = json.loads(instruction_values("ENTRYPOINT")[-1])
    command = image_command(json.loads(instruction_values("CMD")[-1]))
    env = image_env(APPLIANCE_CONFIG=str(path))
    log = tmp_path / "appliance.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port("127.0.0.1", config["listeners"]["imap"]["port"])
        health = subprocess.run(
            image_command(["healthcheck"]),
            env=env,
            capture_output=True,
            check=False,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        process.send_signal(getattr(signal, instruction_values("STOPSIGNAL")[-1]))
        exit_code = process.wait(COMMAND_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert entrypoint == ["appliance"]
    assert health.returncode == 0, health.stdout
    assert health.stdout.startswith("healthy:")
    assert exit_code == 0, log.read_text()


def test_image_command_without_config_mount_fails(tmp_path: Path) -> None:
    default_config = Path(image_env()["APPLIANCE_CONFIG"])
    if default_config.exists():
        pytest.skip(f"{default_config} exists on this machine")
    result = subprocess.run(
        image_command(json.loads(instruction_values("CMD")[-1])),
        cwd=tmp_path,
        env=image_env(),
        capture_output=True,
        check=False,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert result.returncode == 2
    assert str(default_config) in result.stderr
