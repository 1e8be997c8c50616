"""Unit tests of the reload's pure parts: the diff, socket handover and watched set."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from watchfiles import Change

from appliance.config import AppConfig
from appliance.reload import (
    ConfigDiff,
    WatchSet,
    build_watch_set,
    diff_configs,
    file_digests,
    named_files,
    plan_sockets,
)

UPSTREAMS = {"mail": {"host": "192.0.2.10", "tls": "implicit"}}

# Seconds a digest may take before the test counts it as blocked.
BLOCKED_AFTER = 10.0


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # AppConfig reads APPLIANCE_* variables, so the caller's shell must not leak in.
    for name in list(os.environ):
        if name.upper().startswith("APPLIANCE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, Path]:
    # The models only check that the files are readable; no TLS context is built here.
    files = {}
    for name in ("cert", "key", "ca"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text(f"{name} version 1\n")
    return files


def listener(port: int, protocol: str = "imap", **extra: Any) -> dict[str, Any]:
    return {"protocol": protocol, "port": port, "upstream": "mail", **extra}


def make_config(
    listeners: dict[str, dict[str, Any]], upstreams: dict | None = None, **extra: Any
) -> AppConfig:
    return AppConfig(listeners=listeners, upstreams=upstreams or UPSTREAMS, **extra)


def tls_listener(port: int, files: dict[str, Path]) -> dict[str, Any]:
    return listener(
        port, tls="implicit", cert_file=str(files["cert"]), key_file=str(files["key"])
    )


# diff_configs: listeners


def test_identical_configs_give_empty_diff() -> None:
    old = make_config({"imap": listener(1143)})
    new = make_config({"imap": listener(1143)})

    diff = diff_configs(old, new)

    assert diff.is_empty
    assert diff == ConfigDiff()


def test_reference_case_change_is_no_change() -> None:
    old = make_config({"imap": listener(1143)})
    new = make_config({"imap": listener(1143, upstream="MAIL")})

    diff = diff_configs(old, new)

    assert diff.is_empty


def test_new_listener_is_added() -> None:
    old = make_config({"imap": listener(1143)})
    new = make_config({"imap": listener(1143), "pop3": listener(1110, "pop3")})

    diff = diff_configs(old, new)

    assert diff.added == ("pop3",)
    assert diff.incoming == ("pop3",)
    assert diff.outgoing == ()
    assert diff.changes == ("listeners.pop3 added on 127.0.0.1:1110 (pop3)",)


def test_missing_listener_is_removed() -> None:
    old = make_config({"imap": listener(1143), "pop3": listener(1110, "pop3")})
    new = make_config({"imap": listener(1143)})

    diff = diff_configs(old, new)

    assert diff.removed == ("pop3",)
    assert diff.outgoing == ("pop3",)
    assert diff.incoming == ()
    assert diff.changes == ("listeners.pop3 removed",)


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        ({"port": 2143}, "from 127.0.0.1:1143 (imap) to 127.0.0.1:2143 (imap)"),
        ({"bind": "::1"}, "from 127.0.0.1:1143 (imap) to [::1]:1143 (imap)"),
        ({"protocol": "pop3"}, "from 127.0.0.1:1143 (imap) to 127.0.0.1:1143 (pop3)"),
    ],
)
def test_address_or_protocol_change_rebinds(changed: dict, expected: str) -> None:
    old = make_config({"imap": listener(1143)})
    new = make_config({"imap": {**listener(1143), **changed}})

    diff = diff_configs(old, new)

    assert diff.rebound == ("imap",)
    assert diff.incoming == ("imap",)
    assert diff.outgoing == ("imap",)
    assert diff.changes == (f"listeners.imap rebound {expected}",)


def test_other_listener_field_keeps_socket() -> None:
    upstreams = {**UPSTREAMS, "backup": {"host": "192.0.2.11"}}
    old = make_config({"imap": listener(1143)}, upstreams)
    new = make_config({"imap": listener(1143, upstream="backup")}, upstreams)

    diff = diff_configs(old, new)

    assert diff.rebound == ()
    assert diff.incoming == ()
    assert diff.changes == ("listeners.imap changed: upstream",)


def test_tls_settings_change_keeps_socket(pem_files: dict[str, Path]) -> None:
    old = make_config({"imaps": tls_listener(1993, pem_files)})
    new_listener = {**tls_listener(1993, pem_files), "min_version": "1.3"}
    new = make_config({"imaps": new_listener})

    diff = diff_configs(old, new)

    assert diff.rebound == ()
    assert diff.changes == ("listeners.imaps changed: min_version",)


def test_rotated_certificate_is_a_change(pem_files: dict[str, Path]) -> None:
    config = make_config({"imaps": tls_listener(1993, pem_files)})
    before = file_digests([pem_files["cert"], pem_files["key"]])
    pem_files["cert"].write_text("cert version 2\n")
    after = file_digests([pem_files["cert"], pem_files["key"]])

    diff = diff_configs(config, config, before, after)

    assert diff.rebound == ()
    assert diff.changes == ("listeners.imaps certificate files changed",)


def test_unchanged_certificate_is_no_change(pem_files: dict[str, Path]) -> None:
    config = make_config({"imaps": tls_listener(1993, pem_files)})
    digests = file_digests([pem_files["cert"], pem_files["key"]])

    diff = diff_configs(config, config, digests, dict(digests))

    assert diff.is_empty


# diff_configs: upstreams and other sections


def test_upstream_changes_are_named() -> None:
    old = make_config(
        {}, {"mail": {"host": "192.0.2.10"}, "old": {"host": "192.0.2.1"}}
    )
    new = make_config(
        {}, {"mail": {"host": "192.0.2.20", "port": 993}, "new": {"host": "192.0.2.2"}}
    )

    diff = diff_configs(old, new)

    assert "upstreams.old removed" in diff.changes
    assert "upstreams.new added" in diff.changes
    assert "upstreams.mail changed: host, port" in diff.changes
    assert len(diff.changes) == 3


def test_rotated_ca_file_changes_upstream(pem_files: dict[str, Path]) -> None:
    upstreams = {"mail": {"host": "192.0.2.10", "ca_file": str(pem_files["ca"])}}
    config = make_config({}, upstreams)
    before = file_digests([pem_files["ca"]])
    pem_files["ca"].write_text("ca version 2\n")

    diff = diff_configs(config, config, before, file_digests([pem_files["ca"]]))

    assert diff.changes == ("upstreams.mail CA or client certificate files changed",)


def test_section_changes_name_fields() -> None:
    old = make_config({})
    new = make_config(
        {},
        limits={"idle_timeout": 1900, "drain_removed_listeners_after": 30},
        known_servers=[{"host": "192.0.2.10", "mode": "implicit"}],
    )

    diff = diff_configs(old, new)

    assert "limits changed: idle_timeout, drain_removed_listeners_after" in diff.changes
    assert "known_servers changed" in diff.changes
    assert len(diff.changes) == 2


# plan_sockets


def test_moved_listener_binds_new_socket() -> None:
    old = make_config({"imap": listener(1143)})
    new = make_config({"imap": listener(2143)})

    plan = plan_sockets(old.listeners, new.listeners, diff_configs(old, new))

    assert plan == {"imap": None}


def test_protocol_change_takes_over_own_socket() -> None:
    old = make_config({"mail": listener(1143)})
    new = make_config({"mail": listener(1143, "pop3")})

    plan = plan_sockets(old.listeners, new.listeners, diff_configs(old, new))

    assert plan == {"mail": "mail"}


def test_renamed_listener_takes_over_socket() -> None:
    old = make_config({"imap": listener(1143)})
    new = make_config({"imap-plain": listener(1143)})

    plan = plan_sockets(old.listeners, new.listeners, diff_configs(old, new))

    assert plan == {"imap-plain": "imap"}


def test_swapped_ports_swap_sockets() -> None:
    old = make_config({"a": listener(1143), "b": listener(2143)})
    new = make_config({"a": listener(2143), "b": listener(1143)})

    plan = plan_sockets(old.listeners, new.listeners, diff_configs(old, new))

    assert plan == {"a": "b", "b": "a"}


listener_maps = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d"]),
    st.tuples(st.sampled_from([1001, 1002, 1003]), st.sampled_from(["imap", "pop3"])),
    max_size=3,
).filter(lambda entries: len({port for port, _ in entries.values()}) == len(entries))


def as_config(entries: dict[str, tuple[int, str]]) -> AppConfig:
    return make_config(
        {name: listener(port, proto) for name, (port, proto) in entries.items()}
    )


@settings(max_examples=200, deadline=None)
@given(old_entries=listener_maps, new_entries=listener_maps)
def test_diff_and_plan_cover_every_listener(old_entries, new_entries) -> None:
    old, new = as_config(old_entries), as_config(new_entries)
    diff = diff_configs(old, new)
    plan = plan_sockets(old.listeners, new.listeners, diff)
    kept = set(old.listeners) - set(diff.outgoing)
    handed_over = [source for source in plan.values() if source is not None]

    assert set(diff.incoming) | kept == set(new.listeners)
    assert set(diff.outgoing) | kept == set(old.listeners)
    assert not set(diff.incoming) & kept
    assert len(handed_over) == len(set(handed_over))
    assert set(handed_over) <= set(diff.outgoing)
    for name, source in plan.items():
        if source is not None:
            assert old.listeners[source].port == new.listeners[name].port


# Watched set


def test_watch_set_names_config_and_tls_files(
    tmp_path: Path, pem_files: dict[str, Path]
) -> None:
    upstreams = {"mail": {"host": "192.0.2.10", "ca_file": str(pem_files["ca"])}}
    config = make_config({"imaps": tls_listener(1993, pem_files)}, upstreams)
    config_file = tmp_path / "etc" / "appliance.yaml"

    watch_set = build_watch_set(config, config_file, None)

    expected = {config_file, pem_files["cert"], pem_files["key"], pem_files["ca"]}
    assert watch_set.files == expected
    assert watch_set.folders == {tmp_path, tmp_path / "etc"}


def test_watch_set_paths_are_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)

    watch_set = build_watch_set(
        make_config({}), Path("appliance.yaml"), Path("secrets")
    )

    assert watch_set.files == {tmp_path / "appliance.yaml"}
    assert watch_set.secrets_dir == tmp_path / "secrets"


@pytest.mark.parametrize(
    ("path", "relevant"),
    [
        ("/etc/appliance/appliance.yaml", True),
        ("/etc/appliance/..data", True),
        ("/etc/appliance/..2026_12_04_10_00_00.123", True),
        ("/etc/appliance/appliance.yaml.swp", False),
        ("/etc/appliance/appliance.log", False),
        ("/etc/tls/tls.crt", True),
        ("/etc/tls/other.crt", False),
        ("/elsewhere/..data", False),
        ("/run/secrets/APPLIANCE_UPSTREAMS__MAIL__HOST", True),
        ("/run/secrets/appliance_limits__idle_timeout", True),
        ("/run/secrets/db_password", False),
    ],
)
def test_watch_filter_keeps_relevant_paths(path: str, relevant: bool) -> None:
    files = frozenset({Path("/etc/appliance/appliance.yaml"), Path("/etc/tls/tls.crt")})
    watch_set = WatchSet(files, Path("/run/secrets"))

    assert watch_set(Change.modified, path) is relevant


def test_watch_set_union_keeps_both() -> None:
    first = WatchSet(frozenset({Path("/a/one.pem")}), None)
    second = WatchSet(frozenset({Path("/b/two.pem")}), Path("/run/secrets"))

    union = first.union(second)

    assert union.files == {Path("/a/one.pem"), Path("/b/two.pem")}
    assert union.secrets_dir == Path("/run/secrets")


# Files


def test_named_files_lists_each_entry(pem_files: dict[str, Path]) -> None:
    upstreams = {"mail": {"host": "192.0.2.10", "ca_file": str(pem_files["ca"])}}
    config = make_config({"imaps": tls_listener(1993, pem_files)}, upstreams)

    files = named_files(config)

    assert files == {
        "listeners.imaps": (pem_files["cert"], pem_files["key"]),
        "upstreams.mail": (pem_files["ca"],),
    }


def test_digest_of_missing_file_is_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"

    assert file_digests([missing]) == {missing: "unreadable"}


def test_fifo_digest_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "cert.pem"
    os.mkfifo(fifo)
    digests: dict[Path, str] = {}
    worker = threading.Thread(
        target=lambda: digests.update(file_digests([fifo])), daemon=True
    )

    worker.start()
    worker.join(BLOCKED_AFTER)
    blocked = worker.is_alive()
    if blocked:
        # Opening and closing the write end ends the blocked open() of the FIFO.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(BLOCKED_AFTER)

    assert not blocked, "hashing blocked on the FIFO"
    assert digests == {fifo: "unreadable"}


def test_digest_of_multi_chunk_file(tmp_path: Path) -> None:
    # Three and a half hashing chunks, so the digest covers every chunk in order.
    data = bytes(range(256)) * (3 * 4096 + 2048)
    path = tmp_path / "bundle.pem"
    path.write_bytes(data)

    assert file_digests([path]) == {path: hashlib.sha256(data).hexdigest()}
