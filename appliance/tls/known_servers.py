"""The known-servers store: the TLS mode learned for each server, kept in `state_dir`.

Records are keyed by protocol, host and the upstream's configured port (None when the
upstream uses the standard ports). The file `known_servers.json` is replaced atomically:
a temporary file in the same folder is written and fsynced, renamed over the old one, and
the folder is fsynced, so a crash leaves either the old or the new file. Writers take an
flock on `known_servers.json.lock` and merge with what is on disk, so the appliance and
the `known-servers` command can edit the file at the same time. Readers compare the file's
inode, size and mtime before each lookup and reload when it changed, so a running
appliance picks up edits made with the command.

A file that cannot be read or parsed is logged, renamed to
`known_servers.json.corrupt-<UTC timestamp>` and rebuilt from memory and new probes; it
never stops the appliance. Of two records for one server in a hand-edited file, the
safer one is used: the pinned one, then the one with the stronger mode.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeVar

from loguru import logger
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from appliance.files import read_regular
from appliance.logs import RepeatLimiter
from appliance.tls.probe import mode_strength

FILE_NAME = "known_servers.json"
LOCK_SUFFIX = ".lock"
FORMAT_VERSION = 1
# Maximum number of learned records. A `tls: auto` template under a wildcard host rule
# learns one record for each host name that clients log in with, so without a cap the
# store would grow with every name that resolves. Pinned records do not count toward it
# and are never evicted.
MAX_LEARNED_RECORDS = 10_000
# Largest store file read, in bytes. A record takes a few hundred bytes, so the limit
# leaves room for MAX_LEARNED_RECORDS and many pinned ones.
MAX_STORE_FILE_SIZE = 64 << 20
# Minimum seconds between two warnings about evicted records, so that a burst of
# evictions logs one line.
EVICTION_WARNING_INTERVAL = 300.0

Mode = Literal["implicit", "starttls", "none"]
T = TypeVar("T")


class StateDirError(Exception):
    """The state folder cannot be created or written; raised at start."""


class StoreReadError(Exception):
    """The store file is unreadable or corrupt, and repair was not requested."""


class StoreWriteError(Exception):
    """The store file could not be written; the change is kept in memory only."""


@dataclass(frozen=True)
class ServerKey:
    """One server for one protocol; `port` is the upstream's configured port or None."""

    protocol: str
    host: str
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = "" if self.port is None else f":{self.port}"
        return f"{self.protocol}://{host}{suffix}"

    def sort_key(self) -> tuple[str, str, int]:
        return self.host, self.protocol, self.port or 0


class KnownServerRecord(BaseModel):
    """Learned or pinned facts about one server, as stored in the JSON file."""

    # Unknown fields are ignored, so a file written by a newer version still loads.
    model_config = ConfigDict(frozen=True, extra="ignore")

    protocol: Literal["imap", "pop3"]
    host: str = Field(min_length=1)
    """Lower case, as the config's upstream hosts are; a hand edit may use any case."""
    port: int | None = Field(ge=1, le=65535)
    """Configured upstream port that the record applies to; None for standard ports."""
    mode: Mode
    connect_port: int = Field(ge=1, le=65535)
    """Port that `mode` connects to."""
    # Times need a UTC offset: a time without one could not be compared with the clock.
    first_seen: AwareDatetime
    last_seen: AwareDatetime
    """Last probe or session that reached the server in `mode`."""
    last_probed: AwareDatetime
    fingerprint_sha256: str | None = None
    """SHA-256 of the server's certificate, for information only: certificates renew,
    so it is never used as a pin."""
    tls_version: str | None = None
    pinned: bool = False
    """Set by an operator with `known-servers pin`; probes never change it."""

    @field_validator("host")
    @classmethod
    def _lower_host(cls, host: str) -> str:
        return host.lower()

    @property
    def key(self) -> ServerKey:
        return ServerKey(self.protocol, self.host, self.port)


class StoreFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: Literal[1]
    servers: list[KnownServerRecord]


def utc_now() -> datetime:
    return datetime.now(UTC)


def merge_learned(
    old: KnownServerRecord | None, new: KnownServerRecord
) -> KnownServerRecord:
    """Return the record to keep after a probe or session learned `new`.

    Learning never changes an operator's pin. A mode moves only upward, from plain text
    to STARTTLS to implicit TLS, and a weaker finding only refreshes the probe time.
    """
    if old is None:
        return new
    if old.pinned:
        return old
    if mode_strength(new.mode) < mode_strength(old.mode):
        return old.model_copy(update={"last_probed": new.last_probed})
    return new.model_copy(update={"first_seen": old.first_seen})


class KnownServerStore:
    """Learned records in memory, mirrored to `state_dir/known_servers.json`.

    With `state_dir` None the store lives in memory only. Lookups are cheap enough for
    every session (one stat call), and writes block on fsync, so async callers run
    them in a thread. Methods are safe to call from several threads.

    When learning a new server takes the learned records over `max_learned_records`,
    the least recently seen learned records are evicted, and their servers are probed
    again at their next session. Pinned records are never evicted.
    """

    def __init__(
        self,
        state_dir: Path | None,
        *,
        max_learned_records: int = MAX_LEARNED_RECORDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_learned_records < 1:
            raise ValueError("max_learned_records must be positive")
        self.state_dir = state_dir
        self.path = None if state_dir is None else state_dir / FILE_NAME
        self._records: dict[ServerKey, KnownServerRecord] = {}
        self._signature: tuple[int, ...] | None = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._load_failure: str | None = None
        self._max_learned_records = max_learned_records
        self._eviction_warnings = RepeatLimiter(EVICTION_WARNING_INTERVAL, clock)

    @classmethod
    def open(cls, state_dir: Path, *, persist: bool = True) -> KnownServerStore:
        """Return a store for `state_dir`, creating the folder if needed.

        Raises StateDirError when persistence is on and the folder cannot be created or
        written. A broken store file is only logged and moved aside.
        """
        if not persist:
            logger.info(
                "known-servers persistence is off: learned TLS modes last until restart"
            )
            return cls(None)
        prepare_state_dir(state_dir)
        store = cls(state_dir)
        store.refresh()
        logger.info(
            "known-servers store {} contains {} records",
            store.path,
            len(store._records),
        )
        return store

    @property
    def persistent(self) -> bool:
        return self.path is not None

    # Reading

    def get(self, key: ServerKey) -> KnownServerRecord | None:
        self.refresh()
        with self._lock:
            return self._records.get(key)

    def records(self) -> list[KnownServerRecord]:
        self.refresh()
        with self._lock:
            return [
                self._records[key]
                for key in sorted(self._records, key=ServerKey.sort_key)
            ]

    def refresh(self, *, repair: bool = True) -> None:
        """Reload the file when its inode, size or mtime changed since the last load.

        A missing file means no records, because removing it is how an operator
        forgets everything. With `repair` false a broken file is left in place and
        StoreReadError is raised instead.
        """
        if self.path is None:
            return
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._forget_file()
            return
        except OSError as exc:
            self._report_load_failure(f"cannot stat {self.path}: {exc.strerror}")
            return
        signature = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if signature == self._signature:
            return
        self._load(signature, repair=repair)

    def _forget_file(self) -> None:
        with self._lock:
            if self._signature is not None and self._records:
                logger.warning(
                    "known-servers file {} was removed; forgetting {} records",
                    self.path,
                    len(self._records),
                )
                self._records = {}
            self._signature = None

    def _load(self, signature: tuple[int, ...], *, repair: bool) -> None:
        assert self.path is not None
        try:
            # A FIFO at the path must not block the event loop, which calls this.
            data = read_regular(self.path, MAX_STORE_FILE_SIZE)
            parsed = StoreFile.model_validate_json(data)
        except (OSError, ValidationError, ValueError) as exc:
            reason = _load_error_text(exc)
            if not repair:
                raise StoreReadError(f"{self.path} is unreadable or corrupt: {reason}")
            self._set_aside(signature, reason)
            return
        records = _index_records(parsed.servers, self.path)
        with self._lock:
            self._records = records
            self._signature = signature
            self._load_failure = None

    def _set_aside(self, signature: tuple[int, ...], reason: str) -> None:
        """Move a broken file out of the way; the records in memory stay in use."""
        assert self.path is not None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = _unused_path(self.path.with_name(f"{FILE_NAME}.corrupt-{stamp}"))
        try:
            os.rename(self.path, target)
        except OSError as exc:
            # Remember the signature so that every lookup does not retry and log again.
            with self._lock:
                self._signature = signature
            self._report_load_failure(
                f"{self.path} is unreadable or corrupt ({reason}) and could not be "
                f"moved aside ({exc.strerror}); records stay in memory until it is fixed"
            )
            return
        with self._lock:
            self._signature = None
            records = dict(self._records)
        logger.error(
            "known-servers file {} is unreadable or corrupt ({}); moved it to {}; {} "
            "records in memory are written to a new file",
            self.path,
            reason,
            target,
            len(records),
        )
        if not records:
            return
        # Written at once, so a restart before the next learned record keeps the records
        # and their downgrade protection.
        try:
            self._persist(records)
        except StoreWriteError as exc:
            logger.error("{}", exc)

    def _report_load_failure(self, message: str) -> None:
        if message != self._load_failure:
            logger.error("{}", message)
        self._load_failure = message

    # Writing

    def learn(self, record: KnownServerRecord) -> KnownServerRecord:
        """Store what a probe or session learned, moving the mode only upward.

        Returns the record now stored. Raises StoreWriteError when the file could not
        be written; the record is kept in memory all the same.
        """

        def change(records: dict[ServerKey, KnownServerRecord]) -> KnownServerRecord:
            is_new = record.key not in records
            merged = merge_learned(records.get(record.key), record)
            records[record.key] = merged
            if is_new:
                self._evict_over_cap(records, keep=record.key)
            return merged

        return self._modify(change)

    def _evict_over_cap(
        self, records: dict[ServerKey, KnownServerRecord], keep: ServerKey
    ) -> None:
        """Remove the least recently seen learned records beyond the cap, except `keep`."""
        learned = [
            found for found in records.values() if not found.pinned and found.key != keep
        ]
        excess = len(learned) + 1 - self._max_learned_records
        if excess <= 0:
            return
        oldest = heapq.nsmallest(excess, learned, key=_recency)
        for evicted in oldest:
            del records[evicted.key]
        self._report_eviction(excess, oldest[0].key)

    def _report_eviction(self, count: int, example: ServerKey) -> None:
        """Log a warning for evicted records, at most once per warning interval."""
        held_back = self._eviction_warnings.allow("evicted", count)
        if held_back is None:
            return
        logger.warning(
            "known-servers store is at its cap of {} learned records: evicted {} least "
            "recently seen records since the last warning, such as {}. Their servers "
            "are probed again at their next session. Pin servers that must keep their "
            "mode in known_servers or with `known-servers pin`",
            self._max_learned_records,
            held_back + count,
            example,
        )

    def update(self, key: ServerKey, **fields: object) -> KnownServerRecord | None:
        """Change fields other than the mode of an existing record, such as last_seen."""
        if "mode" in fields:
            raise ValueError("update() never changes a mode; use learn() or pin()")

        def change(
            records: dict[ServerKey, KnownServerRecord],
        ) -> KnownServerRecord | None:
            old = records.get(key)
            if old is None:
                return None
            records[key] = old.model_copy(update=fields)
            return records[key]

        return self._modify(change)

    def pin(self, key: ServerKey, mode: str, connect_port: int) -> KnownServerRecord:
        """Set a mode as the operator's word, replacing any record, weaker or not."""
        now = utc_now()

        def change(records: dict[ServerKey, KnownServerRecord]) -> KnownServerRecord:
            old = records.get(key)
            record = KnownServerRecord(
                protocol=key.protocol,
                host=key.host,
                port=key.port,
                mode=mode,
                connect_port=connect_port,
                first_seen=old.first_seen if old else now,
                last_seen=old.last_seen if old else now,
                last_probed=old.last_probed if old else now,
                fingerprint_sha256=old.fingerprint_sha256 if old else None,
                tls_version=old.tls_version if old else None,
                pinned=True,
            )
            records[key] = record
            return record

        return self._modify(change)

    def forget(
        self, host: str, *, port: int | None = None, protocol: str | None = None
    ) -> list[KnownServerRecord]:
        """Remove the records of `host`, optionally only one port or protocol.

        `port` matches the configured port or the port that the mode connects to.
        """

        def matches(record: KnownServerRecord) -> bool:
            if record.host != host:
                return False
            if protocol is not None and record.protocol != protocol:
                return False
            return port is None or port in (record.port, record.connect_port)

        def change(
            records: dict[ServerKey, KnownServerRecord],
        ) -> list[KnownServerRecord]:
            removed = [record for record in records.values() if matches(record)]
            for record in removed:
                del records[record.key]
            return removed

        return self._modify(change)

    def _modify(self, change: Callable[[dict[ServerKey, KnownServerRecord]], T]) -> T:
        """Apply `change` to the latest records and write them; raise StoreWriteError."""
        with self._write_lock, self._file_lock():
            self.refresh()
            with self._lock:
                records = dict(self._records)
                result = change(records)
                self._records = records
            self._persist(records)
            return result

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        lock_path = self.path.with_name(FILE_NAME + LOCK_SUFFIX)
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreWriteError(
                f"cannot open lock file {lock_path}: {exc.strerror}; the change is kept "
                "in memory only"
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)

    def _persist(self, records: dict[ServerKey, KnownServerRecord]) -> None:
        if self.path is None:
            return
        content = StoreFile(
            format=FORMAT_VERSION,
            servers=[records[key] for key in sorted(records, key=ServerKey.sort_key)],
        )
        data = content.model_dump_json(indent=2).encode() + b"\n"
        try:
            write_atomically(self.path, data)
            stat = os.stat(self.path)
        except OSError as exc:
            raise StoreWriteError(
                f"writing {self.path} failed: {exc.strerror or exc}; the change is kept "
                "in memory only and written with the next change"
            ) from None
        with self._lock:
            self._signature = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        try:
            write_all(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_dir(path.parent)


def write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        view = view[written:]


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def prepare_state_dir(state_dir: Path) -> None:
    """Create `state_dir` if needed; raise StateDirError unless it is a writable folder."""
    hint = (
        "create it writable for the appliance, point state_dir elsewhere, or set "
        "tls_auto.persist_known_servers: false"
    )
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateDirError(
            f"state_dir {str(state_dir)!r} cannot be created: {exc.strerror}; {hint}"
        ) from None
    if not state_dir.is_dir():
        raise StateDirError(f"state_dir {str(state_dir)!r} is not a folder; {hint}")
    try:
        descriptor, temporary = tempfile.mkstemp(dir=state_dir, prefix=".write-test-")
        os.close(descriptor)
        os.unlink(temporary)
    except OSError as exc:
        raise StateDirError(
            f"state_dir {str(state_dir)!r} is not writable: {exc.strerror}; {hint}"
        ) from None


def _index_records(
    servers: list[KnownServerRecord], path: Path
) -> dict[ServerKey, KnownServerRecord]:
    """Return the records by server; of two for one server, keep the safer.

    A hand edit can leave two records for one server. The pinned one wins, and then the
    stronger mode, so that a duplicate never lowers a server's TLS mode.
    """
    records: dict[ServerKey, KnownServerRecord] = {}
    for record in servers:
        old = records.get(record.key)
        if old is not None:
            safer = _safer_record(old, record)
            logger.warning(
                "known-servers file {} has two records for {} ({} and {}); using {}",
                path,
                record.key,
                old.mode,
                record.mode,
                safer.mode,
            )
            record = safer
        records[record.key] = record
    return records


def _recency(record: KnownServerRecord) -> tuple[datetime, datetime, datetime]:
    """Return the sort key of eviction: least recently seen first."""
    return record.last_seen, record.last_probed, record.first_seen


def _safer_record(
    first: KnownServerRecord, second: KnownServerRecord
) -> KnownServerRecord:
    def rank(record: KnownServerRecord) -> tuple[bool, int]:
        return record.pinned, mode_strength(record.mode)

    return second if rank(second) > rank(first) else first


def _unused_path(path: Path) -> Path:
    candidate = path
    for number in range(1, 1000):
        if not candidate.exists():
            return candidate
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def _load_error_text(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "file"
        return f"invalid content at {where}: {first['msg']}"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)


def format_records(records: list[KnownServerRecord]) -> str:
    """Return the records as text for an operator, one block per server."""
    lines = []
    for record in records:
        source = "pinned by an operator" if record.pinned else "learned"
        lines.append(
            f"{record.key}  {record.mode} (port {record.connect_port}, {source})"
        )
        if record.tls_version is not None:
            lines.append(f"  TLS version {record.tls_version}")
        if record.fingerprint_sha256 is not None:
            lines.append(f"  certificate SHA-256 {record.fingerprint_sha256}")
        times = (
            f"  first seen {_format_time(record.first_seen)}, last seen "
            f"{_format_time(record.last_seen)}"
        )
        # Pinned records are not probed, so a probe time would mislead.
        if not record.pinned:
            times += f", last probed {_format_time(record.last_probed)}"
        lines.append(times)
    return "\n".join(lines) + "\n"


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
