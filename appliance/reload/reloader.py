"""The reload itself: load, check, bind, then commit or reject as a whole."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger
from watchfiles import awatch

from appliance import metrics
from appliance.config import AppConfig, ConfigError, LoadedConfig, load_config
from appliance.config.settings import DEFAULT_SECRETS_DIR
from appliance.logs import configure_logging
from appliance.proxy.listener import BindError, Listener
from appliance.proxy.resolver import RESOLVER
from appliance.proxy.session import Snapshot
from appliance.reload.diff import (
    ConfigDiff,
    diff_configs,
    file_digests,
    named_files,
    plan_sockets,
)
from appliance.reload.watch import (
    WATCH_DEBOUNCE_MS,
    WATCH_RETRY_SECONDS,
    WATCH_STEP_MS,
    WatchSet,
    build_watch_set,
)
from appliance.threads import run_in_daemon_thread
from appliance.tls.contexts import TlsContextError, build_all_contexts

if TYPE_CHECKING:
    from appliance.proxy.runtime import Runtime

# Triggers of the reloads that run when the file watch starts and when it restarts
# with other folders. They apply edits made while no watch ran, and they log at INFO
# and change the reload status only when they find one.
WATCH_START = "start-up check"
WATCH_RESTART = "watch restart"
_WATCH_CHECK_UNCHANGED_MESSAGES = {
    WATCH_START: "files unchanged since start-up",
    WATCH_RESTART: "files unchanged since the watch restarted",
}


class ReloadRejected(Exception):
    """A reload step failed. Each of `problems` names a field or file and the reason.

    `loaded` is the rejected config when it passed validation, so its files can be
    watched too.
    """

    def __init__(self, problems: list[str], loaded: LoadedConfig | None = None) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.loaded = loaded


@dataclass
class Prepared:
    """A new config checked in full, with its snapshot, ready to commit."""

    loaded: LoadedConfig
    snapshot: Snapshot
    digests: dict[Path, str]
    diff: ConfigDiff
    listeners: dict[str, Listener] = field(default_factory=dict)
    """Incoming listeners, bound or about to take over an outgoing listener's socket."""
    handover: dict[str, str | None] = field(default_factory=dict)


class Reloader:
    """Runs reloads one at a time, on SIGHUP and on changes to the watched files."""

    def __init__(
        self,
        runtime: Runtime,
        loaded: LoadedConfig,
        *,
        config_path: str | None,
        secrets_dir: str | None,
        digests: dict[Path, str],
    ) -> None:
        """Start with the running config `loaded` and its file `digests`.

        Take the digests with `named_file_digests` before the running snapshot's TLS
        contexts read the files.
        """
        self.runtime = runtime
        self.config_path = config_path
        self.secrets_dir = secrets_dir
        self.digests = digests
        self.watch_set = self._watch_set_of(loaded)
        # Warnings of the last config load that was not rejected, which are logged
        # already: at start by `serve`, later by the reload that first found them. A
        # logging level above WARNING logs none of them, so none counts as logged.
        self._warnings = (
            set(loaded.warnings) if _logs_warnings(loaded.config) else set()
        )
        # Problems of the last reload if it was rejected, else None.
        self._rejected_problems: list[str] | None = None
        self._triggers: set[str] = set()
        self._requested = asyncio.Event()
        self._rewatch = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    # Lifecycle

    def start(self) -> None:
        """Start serving reload requests and watching the files."""
        self._spawn(self._serve_requests())
        self._spawn(self._watch_files())

    def request(self, trigger: str) -> None:
        """Ask for a reload. Requests made while one runs are merged into the next."""
        self._triggers.add(trigger)
        self._requested.set()

    async def stop(self) -> None:
        """Stop watching, abandon a reload in progress and cancel drain deadlines."""
        self._stopping = True
        # Setting the stop event ends watchfiles' worker thread within one step.
        self._rewatch.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_requests(self) -> None:
        while True:
            await self._requested.wait()
            self._requested.clear()
            trigger = " and ".join(sorted(self._triggers))
            self._triggers.clear()
            try:
                await self.reload(trigger)
            except Exception:  # noqa: BLE001 - a failed reload must not stop later ones
                logger.opt(exception=True).error(
                    "config reload ({}) failed with an internal error; "
                    "version {} stays active",
                    trigger,
                    self.runtime.snapshot.version,
                )
                self._record("failed", "internal error")

    async def _watch_files(self) -> None:
        trigger = WATCH_START
        while not self._stopping:
            self._rewatch.clear()
            watch_set = self.watch_set
            folders = sorted(str(f) for f in watch_set.folders if f.is_dir())
            # Changes made while no watch ran, from the config load at start-up to the
            # first watch or during a restart, would be missed. The reload reads the
            # files only after awatch has set up the new watch, which happens before
            # this task first yields, so nothing falls in between.
            self.request(trigger)
            trigger = WATCH_RESTART
            try:
                await self._watch_folders(folders, watch_set)
            except (OSError, RuntimeError) as exc:
                logger.warning(
                    "watching {} failed: {}; retrying in {}s",
                    ", ".join(folders),
                    exc,
                    WATCH_RETRY_SECONDS,
                )
                try:
                    async with asyncio.timeout(WATCH_RETRY_SECONDS):
                        await self._rewatch.wait()
                except TimeoutError:
                    pass

    async def _watch_folders(self, folders: list[str], watch_set: WatchSet) -> None:
        if not folders:
            await self._rewatch.wait()
            return
        logger.debug(
            "watching {} for config and certificate changes", ", ".join(folders)
        )
        async for changes in awatch(
            *folders,
            watch_filter=watch_set,
            debounce=WATCH_DEBOUNCE_MS,
            step=WATCH_STEP_MS,
            stop_event=self._rewatch,
            recursive=False,
        ):
            paths = ", ".join(sorted(path for _, path in changes))
            logger.debug("watched paths changed: {}", paths)
            self.request("file change")

    # One reload

    async def reload(self, trigger: str) -> str:
        """Load, check and apply the config once, and return the outcome.

        The outcome is "applied", "unchanged" or "rejected". One summary line is logged
        at INFO, or at ERROR when rejected. Unless rejected, it is followed by each config
        warning that the previous load did not have, at WARNING. A check after a watch
        restart that finds the problems of the rejected reload before it logs them at
        DEBUG only and leaves the status and metrics alone. A DEBUG line with the
        number of asyncio tasks and open sessions, which tests use to find leaks, ends
        the reload.
        """
        started = time.monotonic()
        new_warnings: list[str] = []
        problems: list[str] = []
        try:
            # Not asyncio.to_thread: a thread stuck on a file would keep the process
            # alive after SIGTERM, while a daemon thread is abandoned at exit.
            prepared = await run_in_daemon_thread(self._load)
            if not prepared.diff.is_empty:
                await self._bind(prepared)
        except ReloadRejected as exc:
            if exc.loaded is not None:
                # Also watch what the rejected config names, so that fixing a broken
                # file there is seen.
                self._watch(self.watch_set.union(self._watch_set_of(exc.loaded)))
            problems = exc.problems
            outcome, detail = "rejected", "; ".join(problems)
        else:
            if prepared.diff.is_empty:
                outcome, detail = "unchanged", "no changes"
            else:
                self._commit(prepared)
                outcome, detail = "applied", "; ".join(prepared.diff.changes)
            self._watch(self._watch_set_of(prepared.loaded))
            new_warnings = self._take_new_warnings(prepared.loaded)
        seconds = time.monotonic() - started
        repeated = trigger == WATCH_RESTART and problems == self._rejected_problems
        self._rejected_problems = problems if outcome == "rejected" else None
        if outcome == "rejected" and repeated:
            # A rejected reload that names a file in another folder restarts the watch,
            # and the check after the restart finds the same problems again. They were
            # logged and counted a moment ago, so the check logs them at DEBUG only.
            logger.debug(
                "files still have the {} problems of the last rejected reload; "
                "took {:.3f}s",
                len(problems),
                seconds,
            )
            return outcome
        if trigger in _WATCH_CHECK_UNCHANGED_MESSAGES and outcome == "unchanged":
            # These checks are not reloads that the operator requested, so the metrics,
            # the status (such as the "applied" of the reload that moved the watch) and
            # the resolver cache stay as they are.
            message = _WATCH_CHECK_UNCHANGED_MESSAGES[trigger]
            logger.debug("{}; took {:.3f}s", message, seconds)
            _log_warnings(new_warnings)
            return outcome
        self._record(outcome, detail)
        self._log_summary(trigger, outcome, detail, seconds, problems)
        _log_warnings(new_warnings)
        logger.debug(
            "after reload: {} asyncio tasks, {} sessions open, {} retired listeners",
            len(asyncio.all_tasks()),
            len(self.runtime.sessions),
            len(self.runtime.retired),
        )
        if outcome != "rejected":
            # An operator who fixed DNS and reloads expects the fix to apply at once.
            RESOLVER.clear()
        if outcome == "applied":
            await _start_all(prepared.listeners.values())
        return outcome

    def _take_new_warnings(self, loaded: LoadedConfig) -> list[str]:
        """Return the warnings of `loaded` that the previous load did not have.

        Warnings that persist were logged already, and repeating them on every reload,
        such as one for each certificate renewal, would bury the new ones. A warning
        that goes away and comes back later counts as new again, and so does a warning
        found while the logging level of `loaded` suppresses WARNING lines.
        """
        current = list(dict.fromkeys(loaded.warnings))
        new_warnings = [w for w in current if w not in self._warnings]
        if _logs_warnings(loaded.config):
            self._warnings = set(current)
        else:
            self._warnings &= set(current)
        return new_warnings

    def _load(self) -> Prepared:
        """Read every source, hash the named files and build the TLS contexts.

        These steps block, so they run in a thread. Files are hashed before the contexts
        load them, so a file that changes in between is newer in the context than in the
        digest, and the next reload loads it again.
        """
        try:
            loaded = load_config(self.config_path, secrets_dir=self.secrets_dir)
        except ConfigError as exc:
            raise ReloadRejected(exc.problems) from None
        digests = named_file_digests(loaded)
        try:
            contexts = build_all_contexts(loaded.config)
        except TlsContextError as exc:
            raise ReloadRejected(exc.problems, loaded) from None
        current = self.runtime.snapshot
        diff = diff_configs(current.config, loaded.config, self.digests, digests)
        snapshot = Snapshot(loaded.config, contexts, current.version + 1)
        return Prepared(loaded, snapshot, digests, diff)

    async def _bind(self, prepared: Prepared) -> None:
        """Create the incoming listeners and bind those that take over no socket."""
        runtime = self.runtime
        snapshot = prepared.snapshot
        configs = snapshot.config.listeners
        prepared.handover = plan_sockets(
            runtime.snapshot.config.listeners, configs, prepared.diff
        )
        prepared.listeners = {
            name: runtime.create_listener(name, configs[name], snapshot)
            for name in prepared.diff.incoming
        }
        try:
            for name, listener in prepared.listeners.items():
                if prepared.handover[name] is None:
                    await listener.bind()
        except BindError as exc:
            _close_all(prepared.listeners.values())
            raise ReloadRejected([str(exc)], prepared.loaded) from None
        except BaseException:
            _close_all(prepared.listeners.values())
            raise

    def _commit(self, prepared: Prepared) -> None:
        """Swap in the new snapshot and listeners.

        Nothing here can fail or wait, so a reload cancelled at shutdown either has
        committed in full or has changed nothing.
        """
        runtime = self.runtime
        snapshot = prepared.snapshot
        old_config = runtime.snapshot.config
        old_listeners = runtime.listeners
        listeners: dict[str, Listener] = {}
        for name, config in snapshot.config.listeners.items():
            listener = prepared.listeners.get(name) or old_listeners[name]
            listener.config = config
            listener.snapshot = snapshot
            listeners[name] = listener
        for name, previous in prepared.handover.items():
            if previous is not None:
                listeners[name].adopt_socket(old_listeners[previous])
        outgoing = [old_listeners[name] for name in prepared.diff.outgoing]
        for listener in outgoing:
            listener.stop_accepting()
        runtime.retired = [r for r in runtime.retired if r.sessions] + outgoing
        runtime.listeners = listeners
        runtime.snapshot = snapshot
        self.digests = prepared.digests
        if old_config.logging != snapshot.config.logging:
            configure_logging(
                snapshot.config.logging.level, snapshot.config.logging.json_output
            )
        removed = [old_listeners[name] for name in prepared.diff.removed]
        deadline = snapshot.config.limits.drain_removed_listeners_after
        if deadline is not None and any(listener.sessions for listener in removed):
            self._spawn(_drain(removed, deadline))

    # Bookkeeping

    def _secrets_folder(self) -> Path | None:
        folder = Path(
            self.secrets_dir
            or os.environ.get("APPLIANCE_SECRETS_DIR")
            or DEFAULT_SECRETS_DIR
        )
        return folder if folder.is_dir() else None

    def _watch_set_of(self, loaded: LoadedConfig) -> WatchSet:
        return build_watch_set(loaded.config, loaded.path, self._secrets_folder())

    def _watch(self, watch_set: WatchSet) -> None:
        """Restart the watch when `watch_set` differs from the one being watched."""
        if watch_set != self.watch_set:
            self.watch_set = watch_set
            self._rewatch.set()

    def _record(self, outcome: str, detail: str) -> None:
        metrics.record_reload(outcome)
        now = time.time()
        status = replace(
            self.runtime.status, outcome=outcome, detail=detail, last_reload_at=now
        )
        if outcome == "applied":
            status = replace(
                status, version=self.runtime.snapshot.version, loaded_at=now
            )
        self.runtime.status = status

    def _log_summary(
        self,
        trigger: str,
        outcome: str,
        detail: str,
        seconds: float,
        problems: list[str],
    ) -> None:
        """Log one summary line, and for a rejected reload its `problems` below it.

        Each problem gets a line of its own, in the list format of `check-config`,
        so that a long problem stays readable and grep finds it by its field.
        """
        version = self.runtime.snapshot.version
        if outcome == "applied":
            logger.info(
                "config reload ({}) applied version {}: {}; took {:.3f}s",
                trigger,
                version,
                detail,
                seconds,
            )
        elif outcome == "unchanged":
            logger.info(
                "config reload ({}) found no changes; version {} stays active; "
                "took {:.3f}s",
                trigger,
                version,
                seconds,
            )
        else:
            count = len(problems)
            logger.error(
                "config reload ({}) rejected: {} problem{}, listed below; version {} "
                "stays active; took {:.3f}s",
                trigger,
                count,
                "" if count == 1 else "s",
                version,
                seconds,
            )
            for problem in problems:
                logger.error("  - {}", problem)


def _logs_warnings(config: AppConfig) -> bool:
    """Return whether the logging level of `config` lets WARNING lines through."""
    return logger.level(config.logging.level).no <= logger.level("WARNING").no


def _log_warnings(warnings: Iterable[str]) -> None:
    """Log config warnings at WARNING, as `serve` does at start."""
    for warning in warnings:
        logger.warning("{}", warning)


def named_file_digests(loaded: LoadedConfig) -> dict[Path, str]:
    """Return the digests of the files that `loaded` names.

    Take them before the TLS contexts read the files, so a file that changes in between
    looks changed to the next reload.
    """
    return file_digests(_all_files(loaded.config))


def _all_files(config: AppConfig) -> set[Path]:
    return {path for paths in named_files(config).values() for path in paths}


async def _start_all(listeners: Iterable[Listener]) -> None:
    for listener in listeners:
        try:
            await listener.start()
        except OSError as exc:
            # Binding succeeded, so only a socket that started listening on the same
            # address in between makes listen() fail here.
            logger.error(
                "listener {} could not start accepting on {}: {}",
                listener.name,
                listener.address,
                exc.strerror or exc,
            )


def _close_all(listeners: Iterable[Listener]) -> None:
    for listener in listeners:
        listener.stop_accepting()


async def _drain(listeners: list[Listener], deadline: float) -> None:
    """Close the removed listeners' sessions that outlive `deadline`, as at shutdown."""
    await asyncio.sleep(deadline)
    sessions = [session for listener in listeners for session in listener.sessions]
    for session in sessions:
        session.shutdown(final=True)
    if sessions:
        names = ", ".join(listener.name for listener in listeners)
        logger.info(
            "closed {} sessions of removed listeners {} at the {}s drain deadline",
            len(sessions),
            names,
            deadline,
        )
