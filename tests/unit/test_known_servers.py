"""Unit tests of the known-servers store: merging, atomic writes, reloads and damage."""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger

from appliance.tls import known_servers
from appliance.tls.known_servers import (
    FILE_NAME,
    KnownServerRecord,
    KnownServerStore,
    ServerKey,
    StateDirError,
    StoreReadError,
    StoreWriteError,
    merge_learned,
)

KEY = ServerKey("imap", "mail.example.org", None)
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def make_record(
    mode: str = "starttls",
    key: ServerKey = KEY,
    *,
    when: datetime = T0,
    pinned: bool = False,
) -> KnownServerRecord:
    return KnownServerRecord(
        protocol=key.protocol,
        host=key.host,
        port=key.port,
        mode=mode,
        connect_port=993 if mode == "implicit" else 143,
        first_seen=when,
        last_seen=when,
        last_probed=when,
        fingerprint_sha256="ab" * 32 if mode != "none" else None,
        tls_version="TLSv1.3" if mode != "none" else None,
        pinned=pinned,
    )


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    handler = logger.add(lambda message: lines.append(str(message)), format="{message}")
    yield lines
    logger.remove(handler)


@pytest.fixture
def store(tmp_path: Path) -> KnownServerStore:
    return KnownServerStore.open(tmp_path / "state")


def leftover_files(folder: Path) -> list[str]:
    """Return names other than the store file and its lock."""
    names = {FILE_NAME, FILE_NAME + ".lock"}
    return sorted(p.name for p in folder.iterdir() if p.name not in names)


# Merging


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("none", "starttls", "starttls"),
        ("none", "implicit", "implicit"),
        ("starttls", "implicit", "implicit"),
        ("starttls", "starttls", "starttls"),
        ("implicit", "starttls", "implicit"),
        ("implicit", "none", "implicit"),
        ("starttls", "none", "starttls"),
    ],
)
def test_merge_moves_mode_only_upward(old: str, new: str, expected: str) -> None:
    later = T0 + timedelta(days=1)
    merged = merge_learned(make_record(old), make_record(new, when=later))

    assert merged.mode == expected
    assert merged.last_probed == later
    assert merged.first_seen == T0


def test_merge_keeps_pinned_record() -> None:
    pinned = make_record("none", pinned=True)

    merged = merge_learned(pinned, make_record("implicit"))

    assert merged == pinned


def test_merge_without_old_record_takes_new() -> None:
    new = make_record("implicit")

    assert merge_learned(None, new) == new


# Persistence


def test_learned_record_survives_reopen(store: KnownServerStore) -> None:
    store.learn(make_record("implicit"))

    reopened = KnownServerStore.open(store.state_dir)

    assert reopened.get(KEY) == make_record("implicit")


def test_store_file_is_versioned_json(store: KnownServerStore) -> None:
    store.learn(make_record())

    content = json.loads(store.path.read_text())

    assert content["format"] == 1
    assert content["servers"][0]["mode"] == "starttls"
    assert content["servers"][0]["host"] == "mail.example.org"


def test_writes_leave_no_temporary_files(store: KnownServerStore) -> None:
    for mode in ("none", "starttls", "implicit"):
        store.learn(make_record(mode))

    assert leftover_files(store.state_dir) == []


def test_missing_state_dir_is_created(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"

    KnownServerStore.open(folder)

    assert folder.is_dir()


def test_state_dir_under_file_is_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")

    with pytest.raises(StateDirError) as caught:
        KnownServerStore.open(blocker / "state")

    assert "cannot be created" in str(caught.value)
    assert "persist_known_servers: false" in str(caught.value)


def test_state_dir_that_is_file_is_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")

    with pytest.raises(StateDirError):
        KnownServerStore.open(blocker)


def test_disabled_persistence_touches_no_files(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    store = KnownServerStore.open(folder, persist=False)

    store.learn(make_record())

    assert store.get(KEY) == make_record()
    assert not folder.exists()


def test_unknown_fields_are_ignored(store: KnownServerStore) -> None:
    data = json.loads(make_record().model_dump_json())
    data["added_by_a_newer_version"] = 1
    store.path.write_text(json.dumps({"format": 1, "servers": [data], "extra": True}))

    assert store.get(KEY) == make_record()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", ""),
        ("port", 99999),
        ("port", 0),
        ("connect_port", 70000),
        ("last_probed", "2026-12-05T07:08:08"),
        ("last_seen", "2026-12-05 07:08:08"),
        ("first_seen", "2026-12-05"),
    ],
)
def test_invalid_record_field_is_corrupt(
    store: KnownServerStore, field: str, value: object
) -> None:
    data = json.loads(make_record().model_dump_json())
    data[field] = value
    store.path.write_text(json.dumps({"format": 1, "servers": [data]}))

    assert store.records() == []
    assert any(".corrupt-" in name for name in leftover_files(store.state_dir))


def test_hand_edited_host_is_lowered(store: KnownServerStore) -> None:
    data = json.loads(make_record().model_dump_json())
    data["host"] = "Mail.Example.ORG"
    store.path.write_text(json.dumps({"format": 1, "servers": [data]}))

    assert store.get(KEY) == make_record()


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (("starttls", False), ("none", False), ("starttls", False)),
        (("none", False), ("implicit", False), ("implicit", False)),
        (("implicit", False), ("none", True), ("none", True)),
        (("none", True), ("implicit", False), ("none", True)),
    ],
)
def test_duplicate_records_keep_safer(
    store: KnownServerStore,
    log_lines: list[str],
    first: tuple[str, bool],
    second: tuple[str, bool],
    expected: tuple[str, bool],
) -> None:
    servers = [
        json.loads(make_record(mode, pinned=pinned).model_dump_json())
        for mode, pinned in (first, second)
    ]
    store.path.write_text(json.dumps({"format": 1, "servers": servers}))

    record = store.get(KEY)

    assert (record.mode, record.pinned) == expected
    assert any("has two records for" in line for line in log_lines)


# Edits by another writer, such as the known-servers command


def test_other_writer_change_is_picked_up(store: KnownServerStore) -> None:
    store.learn(make_record("starttls"))
    other = KnownServerStore(store.state_dir)

    other.pin(KEY, "none", 143)

    assert store.get(KEY).mode == "none"
    assert store.get(KEY).pinned


def test_forget_by_other_writer_is_picked_up(store: KnownServerStore) -> None:
    store.learn(make_record())

    KnownServerStore(store.state_dir).forget("mail.example.org")

    assert store.get(KEY) is None


def test_removed_file_forgets_records(store: KnownServerStore) -> None:
    store.learn(make_record())

    store.path.unlink()

    assert store.get(KEY) is None


def test_writer_merges_with_file(store: KnownServerStore) -> None:
    other = KnownServerStore(store.state_dir)
    second = ServerKey("pop3", "mail.example.org", 995)
    store.learn(make_record())

    other.learn(make_record("implicit", second))

    assert {record.key for record in store.records()} == {KEY, second}


def test_concurrent_writers_lose_nothing(store: KnownServerStore) -> None:
    stores = [store, KnownServerStore(store.state_dir)]
    keys = [ServerKey("imap", f"host{i}.example.org", None) for i in range(20)]

    def learn(index: int) -> None:
        stores[index % 2].learn(make_record(key=keys[index]))

    threads = [threading.Thread(target=learn, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    reopened = KnownServerStore(store.state_dir)
    assert {record.key for record in reopened.records()} == set(keys)


# Pin and forget


def test_pin_can_move_mode_down(store: KnownServerStore) -> None:
    store.learn(make_record("implicit"))

    pinned = store.pin(KEY, "none", 143)

    assert pinned.mode == "none"
    assert pinned.pinned
    assert pinned.first_seen == T0


def test_learning_never_changes_pin(store: KnownServerStore) -> None:
    store.pin(KEY, "starttls", 143)

    store.learn(make_record("implicit"))

    assert store.get(KEY).mode == "starttls"


def test_forget_filters_by_port_and_protocol(store: KnownServerStore) -> None:
    keys = [
        ServerKey("imap", "mail.example.org", None),
        ServerKey("pop3", "mail.example.org", None),
        ServerKey("imap", "mail.example.org", 1143),
        ServerKey("imap", "other.example.org", None),
    ]
    for key in keys:
        store.learn(make_record(key=key))

    by_port = store.forget("mail.example.org", port=1143)
    by_protocol = store.forget("mail.example.org", protocol="pop3")

    assert [record.key for record in by_port] == [keys[2]]
    assert [record.key for record in by_protocol] == [keys[1]]
    assert {record.key for record in store.records()} == {keys[0], keys[3]}


def test_forget_matches_connect_port(store: KnownServerStore) -> None:
    store.learn(make_record("implicit"))

    removed = store.forget("mail.example.org", port=993)

    assert [record.key for record in removed] == [KEY]


def test_update_refuses_mode(store: KnownServerStore) -> None:
    store.learn(make_record())

    with pytest.raises(ValueError):
        store.update(KEY, mode="none")


# Damage: corrupt files, directories, full disks


def test_corrupt_file_is_moved_aside(
    store: KnownServerStore, log_lines: list[str]
) -> None:
    store.path.write_text("{not json")

    assert store.get(KEY) is None

    aside = [name for name in leftover_files(store.state_dir) if ".corrupt-" in name]
    assert len(aside) == 1
    assert (store.state_dir / aside[0]).read_text() == "{not json"
    assert any("unreadable or corrupt" in line for line in log_lines)


def test_corrupt_file_keeps_memory_records(store: KnownServerStore) -> None:
    store.learn(make_record("implicit"))

    store.path.write_text('{"format": 1, "servers": [{"mode": "bogus"}]}')

    assert store.get(KEY).mode == "implicit"


def test_corrupt_file_is_rebuilt_on_write(store: KnownServerStore) -> None:
    store.learn(make_record("implicit"))
    store.path.write_bytes(b"\x00\xff garbage")
    store.get(KEY)

    store.learn(make_record("implicit", ServerKey("pop3", "mail.example.org")))

    reopened = KnownServerStore(store.state_dir)
    assert len(reopened.records()) == 2


def test_corrupt_file_rewritten_from_memory(store: KnownServerStore) -> None:
    store.learn(make_record("implicit"))
    store.path.write_text("not json")

    store.get(KEY)

    assert store.path.is_file()
    assert KnownServerStore(store.state_dir).get(KEY).mode == "implicit"


def test_directory_in_place_of_file(
    store: KnownServerStore, log_lines: list[str]
) -> None:
    store.path.mkdir()

    assert store.get(KEY) is None
    store.learn(make_record())

    assert store.path.is_file()
    assert KnownServerStore(store.state_dir).get(KEY) == make_record()
    assert any("moved it to" in line for line in log_lines)



def test_fifo_in_place_of_file_does_not_block(
    store: KnownServerStore, log_lines: list[str]
) -> None:
    os.mkfifo(store.path)
    found: list[object] = []
    worker = threading.Thread(target=lambda: found.append(store.get(KEY)), daemon=True)

    worker.start()
    worker.join(5)
    blocked = worker.is_alive()
    if blocked:
        # Opening and closing the write end ends the blocked open() of the FIFO.
        os.close(os.open(store.path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)

    assert not blocked, "reading the store blocked on the FIFO"
    assert found == [None]
    assert any("not a regular file but a FIFO" in line for line in log_lines)

def test_unmovable_corrupt_file_logs_once(
    store: KnownServerStore, log_lines: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse_rename(source: object, target: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    store.path.write_text("garbage")
    monkeypatch.setattr(known_servers.os, "rename", refuse_rename)

    for _ in range(3):
        store.get(KEY)

    errors = [line for line in log_lines if "could not be moved aside" in line]
    assert len(errors) == 1


def test_read_only_refresh_leaves_corrupt_file(store: KnownServerStore) -> None:
    store.path.write_text("garbage")

    with pytest.raises(StoreReadError):
        store.refresh(repair=False)

    assert store.path.read_text() == "garbage"


def test_full_disk_keeps_old_file(
    store: KnownServerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.learn(make_record("starttls"))
    before = store.path.read_bytes()

    def disk_full(descriptor: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(known_servers, "write_all", disk_full)
    with pytest.raises(StoreWriteError) as caught:
        store.learn(make_record("implicit"))

    assert "No space left on device" in str(caught.value)
    assert store.path.read_bytes() == before
    assert leftover_files(store.state_dir) == []


def test_full_disk_keeps_record_in_memory(
    store: KnownServerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(descriptor: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(known_servers, "write_all", disk_full)
    with pytest.raises(StoreWriteError):
        store.learn(make_record("implicit"))

    assert store.get(KEY).mode == "implicit"


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_file_content_never_raises(tmp_path: Path, content: bytes) -> None:
    folder = tmp_path / "fuzz"
    folder.mkdir(exist_ok=True)
    for entry in folder.iterdir():
        entry.unlink()
    (folder / FILE_NAME).write_bytes(content)
    store = KnownServerStore(folder)

    records = store.records()

    assert isinstance(records, list)
    assert (folder / FILE_NAME).exists() == _is_valid(content)


def _is_valid(content: bytes) -> bool:
    try:
        known_servers.StoreFile.model_validate_json(content)
    except ValueError:
        return False
    return True


def test_server_key_text() -> None:
    assert str(ServerKey("imap", "mail.example.org", None)) == "imap://mail.example.org"
    assert str(ServerKey("pop3", "::1", 995)) == "pop3://[::1]:995"


# Cap on learned records


class StepClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def host_key(number: int) -> ServerKey:
    return ServerKey("imap", f"host{number}.example.org", None)


def capped_store(folder: Path, clock: StepClock, cap: int = 3) -> KnownServerStore:
    known_servers.prepare_state_dir(folder)
    return KnownServerStore(folder, max_learned_records=cap, clock=clock)


def learn_hosts(store: KnownServerStore, numbers: range) -> None:
    """Learn one host per number, each seen an hour after the one before."""
    for number in numbers:
        when = T0 + timedelta(hours=number)
        store.learn(make_record(key=host_key(number), when=when))


def stored_hosts(store: KnownServerStore) -> set[str]:
    return {record.host for record in store.records()}


def test_cap_evicts_least_recently_seen(tmp_path: Path) -> None:
    store = capped_store(tmp_path / "state", StepClock())
    learn_hosts(store, range(3))
    # host0 was seen last, so host1 is now the least recently seen.
    store.update(host_key(0), last_seen=T0 + timedelta(days=1))

    learn_hosts(store, range(3, 4))

    assert stored_hosts(store) == {
        "host0.example.org",
        "host2.example.org",
        "host3.example.org",
    }
    reopened = KnownServerStore(tmp_path / "state")
    assert stored_hosts(reopened) == stored_hosts(store)


def test_cap_never_evicts_pinned(tmp_path: Path) -> None:
    store = capped_store(tmp_path / "state", StepClock(), cap=2)
    store.pin(host_key(100), "implicit", 993)
    store.pin(host_key(101), "starttls", 143)

    learn_hosts(store, range(5))

    assert stored_hosts(store) == {
        "host100.example.org",
        "host101.example.org",
        "host3.example.org",
        "host4.example.org",
    }


def test_cap_ignores_relearned_server(tmp_path: Path) -> None:
    store = capped_store(tmp_path / "state", StepClock(), cap=2)
    learn_hosts(store, range(2))

    store.learn(make_record("implicit", key=host_key(0), when=T0 + timedelta(days=1)))

    assert stored_hosts(store) == {"host0.example.org", "host1.example.org"}
    assert store.get(host_key(0)).mode == "implicit"


def test_cap_keeps_new_record(tmp_path: Path) -> None:
    store = capped_store(tmp_path / "state", StepClock(), cap=1)
    learn_hosts(store, range(1, 2))

    # Seen earlier than the stored record, but just learned, so it stays.
    store.learn(make_record(key=host_key(0), when=T0))

    assert stored_hosts(store) == {"host0.example.org"}


def test_cap_applies_in_memory(tmp_path: Path) -> None:
    store = KnownServerStore(None, max_learned_records=2, clock=StepClock())

    learn_hosts(store, range(4))

    assert stored_hosts(store) == {"host2.example.org", "host3.example.org"}


def test_cap_trims_oversized_file(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    learn_hosts(KnownServerStore.open(folder), range(5))
    store = KnownServerStore(folder, max_learned_records=2, clock=StepClock())

    learn_hosts(store, range(5, 6))

    assert stored_hosts(store) == {"host4.example.org", "host5.example.org"}


def test_eviction_warning_is_rate_limited(
    tmp_path: Path, log_lines: list[str]
) -> None:
    clock = StepClock()
    store = capped_store(tmp_path / "state", clock, cap=1)
    learn_hosts(store, range(4))
    clock.now += known_servers.EVICTION_WARNING_INTERVAL

    learn_hosts(store, range(4, 5))

    warnings = [line for line in log_lines if "known-servers store is at its cap" in line]
    assert len(warnings) == 2, warnings
    assert "evicted 1 least recently seen records" in warnings[0]
    assert "imap://host0.example.org" in warnings[0]
    # The second warning counts the evictions that the interval kept quiet.
    assert "evicted 3 least recently seen records" in warnings[1]


def test_eviction_written_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "state"
    store = capped_store(folder, StepClock(), cap=2)
    learn_hosts(store, range(3))
    writes: list[Path] = []
    write = known_servers.write_atomically

    def record_write(path: Path, data: bytes) -> None:
        writes.append(path)
        write(path, data)

    monkeypatch.setattr(known_servers, "write_atomically", record_write)
    learn_hosts(store, range(3, 4))

    # The new record and the eviction go to disk in one atomic replacement.
    assert writes == [folder / FILE_NAME]
    stored = json.loads((folder / FILE_NAME).read_text())
    assert [server["host"] for server in stored["servers"]] == [
        "host2.example.org",
        "host3.example.org",
    ]
    assert leftover_files(folder) == []


def test_nonpositive_cap_raises() -> None:
    with pytest.raises(ValueError):
        KnownServerStore(None, max_learned_records=0)
