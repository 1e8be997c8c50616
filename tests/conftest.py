"""Shared pytest fixtures: test certificates and throwaway Dovecot servers.

APPLIANCE_TEST_DOVECOT selects how Dovecot runs: `auto` (default) uses the local
`dovecot` binary when running as root, else Docker when an engine responds,
else skips the tests that need Dovecot. `local` and `docker` force one backend
and fail the tests when it is unavailable, so CI cannot pass by skipping.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.certs import TestPKI
from tests.support.dovecot import DovecotServer

BACKEND_VARIABLE = "APPLIANCE_TEST_DOVECOT"
INSTALL_HINT = "apt-get install dovecot-imapd dovecot-pop3d"
INTEGRATION_DIR = Path(__file__).parent / "integration"

DovecotFactory = Callable[..., DovecotServer]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


def local_backend_problem() -> str | None:
    """Return why the local backend cannot run, or None when it can."""
    if shutil.which("dovecot") is None and not Path("/usr/sbin/dovecot").exists():
        return f"the dovecot binary is missing ({INSTALL_HINT})"
    if os.geteuid() != 0:
        return "the local Dovecot backend must run as root"
    return None


def docker_backend_problem() -> str | None:
    """Return why the docker backend cannot run, or None when it can."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        return "the docker Python package is missing (pip install testcontainers)"
    try:
        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except (DockerException, OSError) as error:
        return f"no Docker engine responds ({type(error).__name__}: {error})"
    return None


def backend_choice() -> str:
    """Return the value of APPLIANCE_TEST_DOVECOT, `auto` when it is unset."""
    choice = os.environ.get(BACKEND_VARIABLE, "auto").strip().lower() or "auto"
    if choice not in ("auto", "local", "docker"):
        raise pytest.UsageError(
            f"invalid {BACKEND_VARIABLE}={choice!r}: use auto, local or docker"
        )
    return choice


@functools.cache
def select_backend() -> tuple[str | None, str]:
    """Return the backend to use, or None and the reason why there is none."""
    choice = backend_choice()
    local_problem = None if choice == "docker" else local_backend_problem()
    if choice != "docker" and local_problem is None:
        return "local", ""
    if choice == "local":
        return None, f"{BACKEND_VARIABLE}=local, but {local_problem}"
    docker_problem = docker_backend_problem()
    if docker_problem is None:
        return "docker", ""
    if choice == "docker":
        return None, f"{BACKEND_VARIABLE}=docker, but {docker_problem}"
    return None, (
        f"no Dovecot for integration tests: {local_problem}, and {docker_problem}. "
        f"Run the tests as root after `{INSTALL_HINT}`, or start a Docker engine."
    )


@pytest.fixture(scope="session")
def dovecot_backend() -> str:
    """Name of the Dovecot backend. Skips the test when `auto` finds none."""
    backend, reason = select_backend()
    if backend is not None:
        return backend
    if backend_choice() == "auto":
        pytest.skip(reason)
    pytest.fail(reason, pytrace=False)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """Test CAs shared by every Dovecot server and proxy listener of the run."""
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def dovecot_factory(dovecot_backend: str, pki: TestPKI) -> Iterator[DovecotFactory]:
    """Start Dovecot servers with DovecotServer's keyword options.

    Servers with equal options start once per run and are shared, so tests must
    not change their mailboxes. `fresh=True` starts a private server instead,
    for tests that deliver or delete messages or fail logins on purpose: Dovecot
    delays logins from a client address after failed ones, whichever the user.
    """
    shared: dict[str, DovecotServer] = {}
    started: list[DovecotServer] = []

    def start(*, fresh: bool = False, **options: Any) -> DovecotServer:
        options.setdefault("backend", dovecot_backend)
        options.setdefault("pki", pki)
        # Defaults are filled in so that tls="both" and no tls share a server.
        arguments = inspect.signature(DovecotServer).bind(**options)
        arguments.apply_defaults()
        key = repr(sorted(arguments.arguments.items()))
        if not fresh and key in shared:
            return shared[key]
        server = DovecotServer(**options)
        server.start()
        started.append(server)
        if not fresh:
            shared[key] = server
        return server

    yield start

    # Dovecot 2.3.19's master took 1.1 s to exit on SIGTERM in local runs, so the
    # servers stop in parallel.
    with ThreadPoolExecutor(max_workers=8) as executor:
        list(executor.map(lambda server: server.stop(), started))


@pytest.fixture(scope="session")
def dovecot(dovecot_factory: DovecotFactory) -> DovecotServer:
    """Shared Dovecot with plain, STARTTLS and implicit-TLS ports and a valid cert."""
    return dovecot_factory(tls="both", cert="valid")
