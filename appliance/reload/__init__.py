"""Hot reload: watch config and certificate files, then apply a new config atomically.

A reload loads every config source again, validates it, builds every TLS context and
binds every new listener socket before it changes anything, so a failure at any step
leaves the running config in place. Applying it never closes a running session. Sessions
keep the snapshot they started with, and a listener that a reload removes or rebinds
stops accepting but keeps its sessions. The one exception is
`limits.drain_removed_listeners_after`.
"""

from appliance.reload.diff import (
    NAMED_SECTIONS,
    RESTART_SECTIONS,
    SOCKET_FIELDS,
    ConfigDiff,
    address_of,
    changed_fields,
    diff_configs,
    file_digests,
    named_files,
    plan_sockets,
)
from appliance.reload.reloader import (
    WATCH_RESTART,
    WATCH_START,
    Prepared,
    Reloader,
    ReloadRejected,
    named_file_digests,
)
from appliance.reload.watch import (
    WATCH_DEBOUNCE_MS,
    WATCH_RETRY_SECONDS,
    WATCH_STEP_MS,
    WatchSet,
    build_watch_set,
)

__all__ = [
    "NAMED_SECTIONS",
    "RESTART_SECTIONS",
    "SOCKET_FIELDS",
    "WATCH_DEBOUNCE_MS",
    "WATCH_RESTART",
    "WATCH_RETRY_SECONDS",
    "WATCH_START",
    "WATCH_STEP_MS",
    "ConfigDiff",
    "Prepared",
    "ReloadRejected",
    "Reloader",
    "WatchSet",
    "address_of",
    "build_watch_set",
    "changed_fields",
    "diff_configs",
    "file_digests",
    "named_file_digests",
    "named_files",
    "plan_sockets",
]
