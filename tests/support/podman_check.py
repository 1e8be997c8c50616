"""Build and run the container image, the compose demo and the testcontainers backend.

This check runs what the offline tests in tests/unit/test_deploy_files.py cannot: the
Dockerfile, compose.yaml with examples/compose/, and the `docker` backend of
tests/support/dovecot.py, all with Podman. It takes several minutes and needs root, so it
is not part of the test suite. Run it from the repository root after `make venv`:

    .venv/bin/python -m tests.support.podman_check --work-dir /var/tmp/podman-check

It needs podman, runc or crun, debootstrap, curl, podman-compose (installed into a venv in
the work folder when missing), Debian's dovecot-imapd and dovecot-pop3d, and access to
Debian's package mirror and PyPI. Base images are never pulled. Stand-ins are built with
debootstrap instead: `debian:bookworm-slim` and a Python image from Debian's python3,
unless --python-image names one.

Every container and build step runs in the host's network, so Podman creates no bridge
and no firewall rules, and every listener binds 127.0.0.1 on a port above 20000. The
check removes the containers, volumes and images that it created, and stops the Podman
API service that it started. It prints one PASS or FAIL line per check and exits 1 when
one failed.
"""

from __future__ import annotations

import argparse
import contextlib
import imaplib
import json
import os
import poplib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import yaml

from tests.support.dovecot import DovecotServer
from tests.support.ports import pick_free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
PROJECT = "appliance-check"
APPLIANCE_IMAGE = "localhost/appliance-check:latest"
PYTHON_STAND_IN = "localhost/appliance-check-python:3.11-bookworm"
DEBIAN_IMAGE = "docker.io/library/debian:bookworm-slim"
DOVECOT_IMAGE = "localhost/appliance-check-dovecot:2.3"
CONTAINER = "appliance-check"
STATE_VOLUME = "appliance-check-state"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
OVERRIDE_FILE = "examples/compose/host-network.override.yaml"
# The ports that OVERRIDE_FILE moves the demo to.
DEMO_DOVECOT_PORTS = (24143, 24993, 24110, 24995)
DEMO_IMAP_PORT = 25143
DEMO_POP3_PORT = 25110
DEMO_ADMIN_PORT = 25914
DEMO_USERS = {"alice": "alice-demo-password", "bob": "bob-demo-password"}
# Longer than limits.shutdown_grace_period (8 s by default), as the Dockerfile advises.
STOP_TIMEOUT = 15
BUILD_TIMEOUT = 1200
COMMAND_TIMEOUT = 120
TESTCONTAINERS_TESTS = (
    "tests/integration/test_dovecot_fixture.py",
    "tests/integration/test_imap_proxy.py",
    "tests/integration/test_pop3_proxy.py",
)
# Left out of the copy of the checkout that the builds and compose run from.
COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".hypothesis",
    "state",
)


class CheckFailed(Exception):
    """A step failed, so the checks after it in the same phase cannot run."""


# Errors that end a phase. The phase's remaining checks are skipped and the next runs.
PHASE_ERRORS = (
    CheckFailed,
    subprocess.TimeoutExpired,
    OSError,
    imaplib.IMAP4.error,
    poplib.error_proto,
)


class Results:
    """PASS and FAIL lines of the checks, with the counts for the summary line."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def record(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"PASS {name}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL {name}: {detail}", flush=True)
        return ok

    def require(self, name: str, ok: bool, detail: str = "") -> None:
        """Record a check and end the phase when it failed."""
        if not self.record(name, ok, detail):
            raise CheckFailed(name)


class Podman:
    """Runner of podman and podman-compose with the check's own containers.conf."""

    def __init__(self, work_dir: Path, runtime: str | None, ulimits: Sequence[str]):
        self.work_dir = work_dir
        self.conf = work_dir / "containers.conf"
        lines = [
            "# Written by tests/support/podman_check.py.",
            "[containers]",
            "# Every container and build step in the host's network: no bridge, no firewall.",
            'netns = "host"',
        ]
        if ulimits:
            lines.append(f"default_ulimits = {json.dumps(list(ulimits))}")
        if runtime:
            lines += ["", "[engine]", f"runtime = {json.dumps(runtime)}"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.env = dict(os.environ)
        self.env.update(
            CONTAINERS_CONF=str(self.conf),
            # HEALTHCHECK exists only in the docker format, and podman-compose passes
            # no --format. Without cached layers, builds leave no unnamed images.
            BUILDAH_FORMAT="docker",
            BUILDAH_LAYERS="false",
        )
        self.created_images: list[str] = []
        self.created_volumes: list[str] = []
        self.created_containers: list[str] = []

    def run(
        self,
        arguments: Sequence[str],
        *,
        timeout: float = COMMAND_TIMEOUT,
        check: bool = True,
        log_name: str | None = None,
        cwd: Path | None = None,
        extra_env: dict[str, str] | None = None,
        program: str = "podman",
    ) -> subprocess.CompletedProcess[str]:
        """Run a command, with its output in a log file of the work folder if named."""
        env = dict(self.env)
        env.update(extra_env or {})
        command = [program, *arguments]
        if log_name is None:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                cwd=cwd,
                check=False,
            )
        else:
            log = self.work_dir / log_name
            with open(log, "w") as output:
                completed = subprocess.run(
                    command,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    env=env,
                    cwd=cwd,
                    check=False,
                )
            text = log.read_text(errors="replace")
            result = subprocess.CompletedProcess(
                command, completed.returncode, text, ""
            )
        if check and result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise CheckFailed(
                f"{' '.join(command[:3])} ... exited {result.returncode}\n{tail}"
            )
        return result

    def exists(self, kind: str, name: str) -> bool:
        return self.run([kind, "exists", name], check=False).returncode == 0

    def logs(self, container: str) -> str:
        result = self.run(["logs", container], check=False)
        return result.stdout + result.stderr

    def exit_code(self, container: str) -> int:
        result = self.run(["inspect", container, "--format", "{{.State.ExitCode}}"])
        return int(result.stdout.strip())


# Stand-in base images


def build_base_images(podman: Podman, args: argparse.Namespace) -> str:
    """Import the missing stand-in images and return the PYTHON_IMAGE to build with."""
    rootfs = podman.work_dir / "rootfs-bookworm"
    needs_python = args.python_image is None and not podman.exists(
        "image", PYTHON_STAND_IN
    )
    needs_rootfs = needs_python or not podman.exists("image", DEBIAN_IMAGE)
    if needs_rootfs and not (rootfs / "usr/bin/apt-get").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        command = ["debootstrap", "--variant=minbase", "bookworm", str(rootfs)]
        run_logged(podman, [*command, DEBIAN_MIRROR], "debootstrap.log")
    if not podman.exists("image", DEBIAN_IMAGE):
        slim = podman.work_dir / "rootfs-slim"
        copy_rootfs(rootfs, slim)
        for lists in (slim / "var/lib/apt/lists").glob("*"):
            if lists.is_file():
                lists.unlink()
        import_rootfs(podman, slim, DEBIAN_IMAGE, ['CMD ["bash"]'])
    if args.python_image is not None:
        return args.python_image
    if needs_python:
        python_root = podman.work_dir / "rootfs-python"
        copy_rootfs(rootfs, python_root)
        install_python(podman, python_root)
        # CMD and LANG as in the official python images. Unlike those, Python is in
        # /usr/bin, and pip installs outside a venv only with PIP_BREAK_SYSTEM_PACKAGES.
        changes = [
            'CMD ["python3"]',
            "ENV LANG=C.UTF-8",
            "ENV PIP_BREAK_SYSTEM_PACKAGES=1",
        ]
        import_rootfs(podman, python_root, PYTHON_STAND_IN, changes)
    return PYTHON_STAND_IN


def run_logged(podman: Podman, command: list[str], log_name: str) -> None:
    podman.run(
        command[1:], program=command[0], log_name=log_name, timeout=BUILD_TIMEOUT
    )


def copy_rootfs(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(["cp", "-a", str(source), str(target)], check=True, timeout=600)


def install_python(podman: Podman, root: Path) -> None:
    """Install Debian's Python and pip into `root`, trusting the host's local CAs.

    The CAs in /usr/local/share/ca-certificates are copied in, so that pip inside the
    image reaches PyPI through whatever the host's own pip trusts.
    """
    # A minbase root file system has no such folder until ca-certificates is installed.
    local_cas = root / "usr/local/share/ca-certificates"
    local_cas.mkdir(parents=True, exist_ok=True)
    for ca_file in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy(ca_file, local_cas / ca_file.name)
    packages = "python3 python3-pip python3-venv python-is-python3 ca-certificates"
    script = (
        "export DEBIAN_FRONTEND=noninteractive && apt-get update"
        f" && apt-get install -y --no-install-recommends {packages}"
        " && update-ca-certificates && apt-get clean && rm -rf /var/lib/apt/lists/*"
    )
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        run_logged(
            podman, ["chroot", str(root), "sh", "-c", script], "python-rootfs.log"
        )
    finally:
        subprocess.run(["umount", str(root / "proc")], check=False)


def import_rootfs(podman: Podman, root: Path, image: str, changes: list[str]) -> None:
    tarball = root.with_suffix(".tar")
    subprocess.run(["tar", "-C", str(root), "-cf", str(tarball), "."], check=True)
    arguments = ["import"]
    for change in changes:
        arguments += ["--change", change]
    podman.run([*arguments, str(tarball), image], timeout=600)
    podman.created_images.append(image)


# The image, run as a single container


def copy_checkout(work_dir: Path) -> Path:
    """Copy the checkout, so that the compose check can edit its config folder."""
    project = work_dir / "project"
    shutil.rmtree(project, ignore_errors=True)
    shutil.copytree(REPO_ROOT, project, ignore=COPY_IGNORE, symlinks=True)
    return project


def build_appliance_image(
    podman: Podman, results: Results, project: Path, python_image: str
) -> None:
    arguments = ["build", "--format", "docker", "--network", "host"]
    arguments += ["--build-arg", f"PYTHON_IMAGE={python_image}", "-t", APPLIANCE_IMAGE]
    podman.run([*arguments, str(project)], log_name="build.log", timeout=BUILD_TIMEOUT)
    podman.created_images.append(APPLIANCE_IMAGE)
    results.record("image builds", True)
    inspected = json.loads(podman.run(["image", "inspect", APPLIANCE_IMAGE]).stdout)[0]
    image_config = inspected["Config"]
    # Podman 4.3 reports the healthcheck beside Config, not inside it.
    healthcheck = (inspected.get("Healthcheck") or {}).get("Test")
    results.record(
        "image user is 10001",
        image_config.get("User") == "10001:10001",
        str(image_config.get("User")),
    )
    results.record(
        "image keeps HEALTHCHECK",
        healthcheck == ["CMD", "appliance", "healthcheck"],
        str(healthcheck),
    )


def write_appliance_config(
    config_dir: Path, dovecot: DovecotServer, ports: dict[str, int]
) -> None:
    """Write the config and the Dovecot CA into the folder mounted at /etc/appliance."""
    assert dovecot.ca_file is not None
    config_dir.mkdir(mode=0o755, exist_ok=True)
    ca_copy = config_dir / "dovecot-ca.pem"
    shutil.copyfile(dovecot.ca_file, ca_copy)
    ca_copy.chmod(0o644)

    upstream = {"host": HOST, "tls": "auto", "ca_file": "/etc/appliance/dovecot-ca.pem"}
    config = {
        "listeners": {
            "imap": {
                "protocol": "imap",
                "bind": HOST,
                "port": ports["imap"],
                "upstream": "imap-server",
            },
            "pop3": {
                "protocol": "pop3",
                "bind": HOST,
                "port": ports["pop3"],
                "upstream": "pop3-server",
            },
        },
        "upstreams": {
            "imap-server": {**upstream, "port": dovecot.ports["imap"]},
            "pop3-server": {**upstream, "port": dovecot.ports["pop3"]},
        },
        "admin": {"enabled": True, "bind": HOST, "port": ports["admin"]},
        "state_dir": "/var/lib/appliance",
        "logging": {"level": "INFO"},
    }

    # Replaced in one rename, as an editor that writes a new file does.
    staging = config_dir / ".appliance.yaml.new"
    staging.write_text(yaml.safe_dump(config, sort_keys=False))
    staging.chmod(0o644)
    os.replace(staging, config_dir / "appliance.yaml")


def run_appliance(podman: Podman, config_dir: Path) -> None:
    arguments = ["run", "-d", "--name", CONTAINER, "--network", "host"]
    arguments += ["--stop-timeout", str(STOP_TIMEOUT)]
    arguments += ["-v", f"{config_dir}:/etc/appliance:ro"]
    arguments += ["-v", f"{STATE_VOLUME}:/var/lib/appliance", APPLIANCE_IMAGE]
    podman.run(arguments)
    if CONTAINER not in podman.created_containers:
        podman.created_containers.append(CONTAINER)


def check_single_container(podman: Podman, results: Results, work_dir: Path) -> None:
    """Run the image with a config folder and a state volume in front of a local Dovecot."""
    with DovecotServer(tls="both") as dovecot:
        ports = {
            name: pick_free_port(HOST) for name in ("imap", "pop3", "admin", "moved")
        }
        config_dir = work_dir / "config"
        write_appliance_config(config_dir, dovecot, ports)
        podman.run(["volume", "create", STATE_VOLUME])
        podman.created_volumes.append(STATE_VOLUME)
        run_appliance(podman, config_dir)
        results.require(
            "container becomes healthy",
            wait_for_http(ports["admin"], "/healthz", timeout=60),
            podman.logs(CONTAINER)[-2000:],
        )
        check_runtime(podman, results)
        check_logins(results, dovecot, ports["imap"], ports["pop3"])
        check_state_volume(podman, results, dovecot)
        check_reload(podman, results, config_dir, dovecot, ports)
        check_stop(podman, results, dovecot, ports["moved"], ports["pop3"])
        podman.run(["rm", CONTAINER])
        run_appliance(podman, config_dir)
        results.record(
            "new container reads state volume",
            wait_for_log(podman, CONTAINER, "contains 2 records", timeout=30),
            podman.logs(CONTAINER)[-2000:],
        )
        podman.run(["stop", CONTAINER], timeout=STOP_TIMEOUT + 30)
        podman.run(["rm", CONTAINER])
    check_missing_config(podman, results)


def check_runtime(podman: Podman, results: Results) -> None:
    users = podman.run(["top", CONTAINER, "huser"]).stdout.split()[1:]
    results.record("process runs as uid 10001", users == ["10001"], str(users))
    logs = podman.logs(CONTAINER)
    results.record(
        "logs reach container output", "appliance ready" in logs, logs[-2000:]
    )
    health = podman.run(["healthcheck", "run", CONTAINER], check=False)
    results.record(
        "podman healthcheck run passes",
        health.returncode == 0,
        f"exit {health.returncode}: {health.stdout}{health.stderr}",
    )


def check_logins(
    results: Results, dovecot: DovecotServer, imap_port: int, pop3_port: int
) -> None:
    try:
        imap = imaplib.IMAP4(HOST, imap_port, timeout=15)
        try:
            imap.login("alice", dovecot.users["alice"])
            status, data = imap.select("INBOX")
        finally:
            imap.logout()
        expected = str(dovecot.message_count("alice")).encode()
        results.record(
            "IMAP login through container",
            status == "OK" and data == [expected],
            f"{status} {data}",
        )
    except (OSError, imaplib.IMAP4.error) as error:
        results.record("IMAP login through container", False, repr(error))
    try:
        pop3 = poplib.POP3(HOST, pop3_port, timeout=15)
        pop3.user("bob")
        pop3.pass_(dovecot.users["bob"])
        count, _ = pop3.stat()
        pop3.quit()
        expected = dovecot.message_count("bob")
        results.record(
            "POP3 login through container", count == expected, f"STAT {count}"
        )
    except (OSError, poplib.error_proto) as error:
        results.record("POP3 login through container", False, repr(error))


def check_state_volume(
    podman: Podman, results: Results, dovecot: DovecotServer
) -> None:
    mountpoint = podman.run(
        ["volume", "inspect", STATE_VOLUME, "--format", "{{.Mountpoint}}"]
    ).stdout.strip()
    store = Path(mountpoint) / "known_servers.json"
    try:
        records = json.loads(store.read_text())["servers"]
    except (OSError, ValueError, KeyError) as error:
        results.record("known-servers state in volume", False, repr(error))
        return
    found = {(record["protocol"], record["port"]) for record in records}
    expected = {("imap", dovecot.ports["imap"]), ("pop3", dovecot.ports["pop3"])}
    results.record("known-servers state in volume", found == expected, str(found))


def check_reload(
    podman: Podman,
    results: Results,
    config_dir: Path,
    dovecot: DovecotServer,
    ports: dict[str, int],
) -> None:
    moved = dict(ports, imap=ports["moved"])
    write_appliance_config(config_dir, dovecot, moved)
    reloaded = wait_until(lambda: port_greets(ports["moved"]), timeout=20)
    results.record(
        "edited config file reloads",
        reloaded and not port_greets(ports["imap"]),
        podman.logs(CONTAINER)[-2000:],
    )


def check_stop(
    podman: Podman,
    results: Results,
    dovecot: DovecotServer,
    imap_port: int,
    pop3_port: int,
) -> None:
    """Stop with a session in the relay and one before login, as an upgrade would."""
    imap = imaplib.IMAP4(HOST, imap_port, timeout=30)
    imap.login("alice", dovecot.users["alice"])
    waiting = socket.create_connection((HOST, pop3_port), timeout=30)
    waiting.recv(256)
    started = time.monotonic()
    podman.run(["stop", CONTAINER], timeout=STOP_TIMEOUT + 30)
    elapsed = time.monotonic() - started
    goodbye = waiting.recv(256)
    waiting.close()
    imap.shutdown()
    exit_code = podman.exit_code(CONTAINER)
    results.record("podman stop exits 0", exit_code == 0, f"exit {exit_code}")
    results.record(
        "podman stop within grace period",
        elapsed < STOP_TIMEOUT,
        f"{elapsed:.1f} s, limit {STOP_TIMEOUT} s",
    )
    results.record(
        "client before login gets -ERR", goodbye.startswith(b"-ERR"), repr(goodbye)
    )
    logs = podman.logs(CONTAINER)
    results.record("shutdown is logged", "shutdown complete" in logs, logs[-2000:])


def check_missing_config(podman: Podman, results: Results) -> None:
    name = f"{CONTAINER}-no-config"
    podman.created_containers.append(name)
    result = podman.run(
        ["run", "--rm", "--name", name, "--network", "host", APPLIANCE_IMAGE],
        check=False,
    )
    output = result.stdout + result.stderr
    results.record(
        "missing config exits 2", result.returncode == 2, f"exit {result.returncode}"
    )
    results.record(
        "missing config names the file",
        "'/etc/appliance/appliance.yaml' does not exist" in output,
        output[-1000:],
    )


# compose.yaml with the host-network override


def check_compose(
    podman: Podman, results: Results, project: Path, compose: str, python_image: str
) -> None:
    busy = [
        port
        for port in (
            *DEMO_DOVECOT_PORTS,
            DEMO_IMAP_PORT,
            DEMO_POP3_PORT,
            DEMO_ADMIN_PORT,
        )
        if not port_free(port)
    ]
    results.require("demo ports are free", not busy, f"in use on {HOST}: {busy}")
    images_before = image_names(podman)
    base = ["-p", PROJECT, "-f", "compose.yaml", "-f", OVERRIDE_FILE]
    extra_env = {"PYTHON_IMAGE": python_image}

    def compose_run(
        arguments: list[str], log_name: str, timeout: float = COMMAND_TIMEOUT
    ):
        return podman.run(
            [*base, *arguments],
            program=compose,
            cwd=project,
            extra_env=extra_env,
            log_name=log_name,
            timeout=timeout,
        )

    compose_run(["up", "-d", "--build"], "compose-up.log", timeout=BUILD_TIMEOUT)
    # The image names depend on the podman-compose version, so the new ones are
    # recorded for removal, and an operator's own appliance:latest is kept.
    podman.created_images += sorted(image_names(podman) - images_before)
    # podman-compose ignores the healthy condition with podman before 4.6, so the
    # appliance may start before Dovecot wrote the CA. It then exits and restarts.
    results.require(
        "compose demo answers curl IMAP",
        wait_until(
            lambda: "Subject: Welcome, alice" in curl_demo("imap", "alice"), timeout=120
        ),
        podman.logs(compose_container(podman, "appliance"))[-2000:],
    )
    results.record(
        "compose demo answers curl POP3",
        "Subject: Welcome, bob" in curl_demo("pop3", "bob"),
    )
    results.record(
        "compose demo is ready", wait_for_http(DEMO_ADMIN_PORT, "/readyz", timeout=10)
    )
    for service in ("appliance", "dovecot"):
        health = podman.run(
            ["healthcheck", "run", compose_container(podman, service)], check=False
        )
        results.record(
            f"compose {service} healthcheck passes",
            health.returncode == 0,
            health.stdout + health.stderr,
        )

    config = project / "examples/compose/appliance/appliance.yaml"
    with open(config, "a") as file:
        file.write("\nlimits:\n  max_connections: 900\n")
    appliance = compose_container(podman, "appliance")
    results.record(
        "compose config edit reloads",
        wait_for_log(podman, appliance, "limits changed: max_connections", timeout=20),
        podman.logs(appliance)[-2000:],
    )

    # A recreated Dovecot container makes a new demo CA, which the appliance reloads.
    compose_run(["down"], "compose-down.log", timeout=STOP_TIMEOUT * 3)
    compose_run(["up", "-d"], "compose-up-again.log")
    results.record(
        "compose recreated demo answers",
        wait_until(
            lambda: "Subject: Welcome, alice" in curl_demo("imap", "alice"), timeout=120
        ),
        podman.logs(compose_container(podman, "appliance"))[-2000:],
    )
    started = time.monotonic()
    compose_run(["stop"], "compose-stop.log", timeout=STOP_TIMEOUT * 3)
    elapsed = time.monotonic() - started
    for service in ("appliance", "dovecot"):
        exit_code = podman.exit_code(compose_container(podman, service))
        results.record(
            f"compose stop exits {service} with 0", exit_code == 0, f"exit {exit_code}"
        )
    results.record(
        "compose stop within grace period",
        elapsed < STOP_TIMEOUT * 2,
        f"{elapsed:.1f} s",
    )


def compose_down(podman: Podman, project: Path, compose: str) -> None:
    podman.run(
        ["-p", PROJECT, "-f", "compose.yaml", "-f", OVERRIDE_FILE, "down", "-v"],
        program=compose,
        cwd=project,
        log_name="compose-down-v.log",
        timeout=STOP_TIMEOUT * 3,
        check=False,
    )


def image_names(podman: Podman) -> set[str]:
    listing = podman.run(["images", "--format", "{{.Repository}}:{{.Tag}}"]).stdout
    return {name for name in listing.split() if not name.startswith("<none>")}


def compose_container(podman: Podman, service: str) -> str:
    """Return the name of a service's container, which podman-compose versions spell differently."""
    arguments = ["ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}"]
    arguments += ["--filter", f"label=com.docker.compose.service={service}"]
    names = podman.run([*arguments, "--format", "{{.Names}}"]).stdout.split()
    if not names:
        raise CheckFailed(f"no container found for compose service {service}")
    return names[0]


def curl_demo(protocol: str, user: str) -> str:
    """Fetch message 1 as README's compose section does, with the override's ports."""
    if protocol == "imap":
        url = f"imap://{HOST}:{DEMO_IMAP_PORT}/INBOX;UID=1"
    else:
        url = f"pop3://{HOST}:{DEMO_POP3_PORT}/1"
    result = subprocess.run(
        ["curl", "-s", "--max-time", "10", "-u", f"{user}:{DEMO_USERS[user]}", url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.stdout


# The testcontainers backend through Podman's Docker-compatible API


def check_testcontainers(podman: Podman, results: Results) -> None:
    containerfile = podman.work_dir / "dovecot.Containerfile"
    containerfile.write_text(
        f"FROM {DEBIAN_IMAGE}\n"
        "RUN apt-get update && apt-get install -y --no-install-recommends"
        " dovecot-imapd dovecot-pop3d && rm -rf /var/lib/apt/lists/*\n"
        'CMD ["/usr/sbin/dovecot", "-F"]\n'
    )
    arguments = [
        "build",
        "--format",
        "docker",
        "--network",
        "host",
        "-t",
        DOVECOT_IMAGE,
    ]
    podman.run(
        [*arguments, "-f", str(containerfile), str(podman.work_dir)],
        log_name="dovecot-build.log",
        timeout=BUILD_TIMEOUT,
    )
    podman.created_images.append(DOVECOT_IMAGE)
    with podman_service(podman) as socket_path:
        env = dict(podman.env)
        env.update(
            DOCKER_HOST=f"unix://{socket_path}",
            # Ryuk, testcontainers' cleanup container, would be pulled from a registry.
            TESTCONTAINERS_RYUK_DISABLED="true",
            APPLIANCE_TEST_DOVECOT="docker",
            APPLIANCE_TEST_DOVECOT_IMAGE=DOVECOT_IMAGE,
            APPLIANCE_TEST_DOVECOT_NETWORK="host",
            PYTHONPATH=str(REPO_ROOT),
        )
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        log = podman.work_dir / "testcontainers-pytest.log"
        with open(log, "w") as output:
            result = subprocess.run(
                [*command, *TESTCONTAINERS_TESTS],
                cwd=REPO_ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=900,
                check=False,
            )
        summary = log.read_text(errors="replace").strip().splitlines()[-1:]
        results.record(
            "testcontainers backend tests pass",
            result.returncode == 0,
            f"exit {result.returncode}, {summary}, see {log}",
        )


@contextlib.contextmanager
def podman_service(podman: Podman) -> Iterator[Path]:
    """Run `podman system service` on a socket in the work folder, stopped by its PID."""
    socket_path = podman.work_dir / "podman.sock"
    socket_path.unlink(missing_ok=True)
    command = ["podman", "system", "service", "--time=0", f"unix://{socket_path}"]
    with open(podman.work_dir / "podman-service.log", "w") as log:
        service = subprocess.Popen(
            command, env=podman.env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            if not wait_until(socket_path.exists, timeout=30):
                raise CheckFailed(
                    f"podman system service created no socket {socket_path} in 30 s"
                )
            yield socket_path
        finally:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(timeout=15)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait(timeout=15)


# Waiting and probing


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 1.0
) -> bool:
    """Return whether `predicate()` became true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def wait_for_http(port: int, path: str, timeout: float) -> bool:
    def responds() -> bool:
        try:
            with urllib.request.urlopen(
                f"http://{HOST}:{port}{path}", timeout=5
            ) as reply:
                return reply.status == 200
        except (OSError, urllib.error.URLError):
            return False

    return wait_until(responds, timeout)


def wait_for_log(podman: Podman, container: str, text: str, timeout: float) -> bool:
    return wait_until(lambda: text in podman.logs(container), timeout)


def port_greets(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=3) as sock:
            return sock.recv(64).startswith((b"* OK", b"+OK"))
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


# Cleanup and the command line


def clean_up(podman: Podman, keep_base_images: bool) -> None:
    """Remove what the check created, by name, and print what could not be removed."""
    for container in podman.created_containers:
        if podman.exists("container", container):
            podman.run(["rm", "-f", "-t", "0", container], check=False)
    for volume in podman.created_volumes:
        podman.run(["volume", "rm", "-f", volume], check=False)
    base_images = {DEBIAN_IMAGE, PYTHON_STAND_IN}
    for image in reversed(podman.created_images):
        if keep_base_images and image in base_images:
            continue
        if podman.exists("image", image):
            result = podman.run(["rmi", image], check=False)
            if result.returncode != 0:
                print(f"could not remove image {image}: {result.stderr.strip()}")
    if not keep_base_images:
        for name in ("rootfs-bookworm", "rootfs-slim", "rootfs-python"):
            shutil.rmtree(podman.work_dir / name, ignore_errors=True)
            (podman.work_dir / f"{name}.tar").unlink(missing_ok=True)


def remove_leftovers(podman: Podman) -> None:
    """Remove the check's own containers and volume that an interrupted run left."""
    for container in (CONTAINER, f"{CONTAINER}-no-config"):
        if podman.exists("container", container):
            print(f"removing container {container} left by an earlier run")
            podman.run(["rm", "-f", "-t", "0", container], check=False)
    if podman.exists("volume", STATE_VOLUME):
        print(f"removing volume {STATE_VOLUME} left by an earlier run")
        podman.run(["volume", "rm", "-f", STATE_VOLUME], check=False)


def find_podman_compose(work_dir: Path) -> str:
    found = shutil.which("podman-compose")
    if found:
        return found
    venv = work_dir / "compose-venv"
    if not (venv / "bin/podman-compose").exists():
        with open(work_dir / "compose-venv.log", "w") as log:
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)], check=True, timeout=300
            )
            subprocess.run(
                [str(venv / "bin/pip"), "install", "podman-compose"],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=600,
            )
    return str(venv / "bin/podman-compose")


def missing_tools() -> list[str]:
    tools = ["podman", "debootstrap", "curl", "dovecot"]
    return [
        tool
        for tool in tools
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.podman_check",
        description="Build and run the container image, the compose demo and the "
        "testcontainers backend with Podman, in the host's network only.",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "appliance-podman-check",
        help="folder for logs, root file systems, the config and a copy of the checkout "
        "(default: appliance-podman-check in the temporary folder)",
    )
    parser.add_argument(
        "--python-image",
        help="base image for the Dockerfile's PYTHON_IMAGE (default: a stand-in with "
        "Debian's python3, built with debootstrap)",
    )
    parser.add_argument(
        "--runtime",
        help="OCI runtime for podman, such as runc where crun rejects the host's cgroups "
        "(default: podman's own)",
    )
    parser.add_argument(
        "--ulimit",
        action="append",
        default=[],
        metavar="NAME=SOFT:HARD",
        help="default ulimit of every container, repeatable, such as nofile=20000:20000 "
        "where podman's defaults exceed the host's hard limits",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("container", "compose", "testcontainers"),
        help="skip a phase (repeatable)",
    )
    parser.add_argument(
        "--keep-base-images",
        action="store_true",
        help="keep the stand-in base images and root file systems for the next run",
    )
    return parser


def prerequisite_problem() -> str | None:
    """Return why the check cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "podman_check must run as root (debootstrap, chroot, rootful podman)"
    missing = missing_tools()
    if missing:
        return (
            f"missing tools: {', '.join(missing)}; install them with apt-get install "
            "podman debootstrap curl dovecot-imapd dovecot-pop3d"
        )
    return None


def run_phases(
    podman: Podman, results: Results, args: argparse.Namespace, project: Path
) -> None:
    python_image = build_base_images(podman, args)
    build_appliance_image(podman, results, project, python_image)

    if "container" not in args.skip:
        run_phase(
            results,
            "container",
            check_single_container,
            podman,
            results,
            podman.work_dir,
        )

    if "compose" not in args.skip:
        compose = find_podman_compose(podman.work_dir)
        try:
            run_phase(
                results,
                "compose",
                check_compose,
                podman,
                results,
                project,
                compose,
                python_image,
            )
        finally:
            compose_down(podman, project, compose)

    if "testcontainers" not in args.skip:
        run_phase(results, "testcontainers", check_testcontainers, podman, results)


def run_phase(
    results: Results, name: str, phase: Callable[..., None], *arguments: object
) -> None:
    """Run one phase, recording an error that ends it as a failed check."""
    try:
        phase(*arguments)
    except PHASE_ERRORS as error:
        results.record(f"{name} phase completes", False, str(error))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = prerequisite_problem()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2

    args.work_dir.mkdir(parents=True, exist_ok=True)
    podman = Podman(args.work_dir.resolve(), args.runtime, args.ulimit)
    remove_leftovers(podman)
    project = copy_checkout(podman.work_dir)
    results = Results()
    try:
        run_phases(podman, results, args, project)
    except PHASE_ERRORS as error:
        results.record("setup completes", False, str(error))
    finally:
        clean_up(podman, args.keep_base_images)

    print(f"{results.passed} passed, {results.failed} failed")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
