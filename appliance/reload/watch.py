"""The files and folders that a reload depends on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from watchfiles import Change

from appliance.config import AppConfig
from appliance.config.settings import ENV_PREFIX
from appliance.reload.diff import named_files

# watchfiles ends a burst of events after WATCH_STEP_MS without a new one, or after
# WATCH_DEBOUNCE_MS at the latest, so one editor save or volume swap gives one reload.
WATCH_STEP_MS = 100
WATCH_DEBOUNCE_MS = 1000
WATCH_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class WatchSet:
    """The files a reload depends on, and the watchfiles filter for their folders.

    Folders are watched instead of files, because an editor that saves by rename and a
    Kubernetes volume that swaps its `..data` symlink both leave a watched file's inode
    behind. The watch is not recursive, because the swap shows up as `..`-prefixed
    entries in the volume's own folder.

    NOTE: a named file that is a symlink into another folder, rewritten in place there,
    is not seen (only a replaced symlink is). SIGHUP reloads it.
    """

    files: frozenset[Path]
    secrets_dir: Path | None = None

    @property
    def folders(self) -> frozenset[Path]:
        folders = {path.parent for path in self.files}
        if self.secrets_dir is not None:
            folders.add(self.secrets_dir)
        return frozenset(folders)

    def __call__(self, change: Change, path: str) -> bool:
        candidate = Path(path)
        if candidate in self.files:
            return True
        if candidate.name.startswith(".."):
            return candidate.parent in self.folders
        return (
            candidate.parent == self.secrets_dir
            and candidate.name.upper().startswith(ENV_PREFIX)
        )

    def union(self, other: WatchSet) -> WatchSet:
        return WatchSet(self.files | other.files, self.secrets_dir or other.secrets_dir)


def build_watch_set(
    config: AppConfig, config_path: Path | None, secrets_dir: Path | None
) -> WatchSet:
    """Return the config file and every file the config names, as absolute paths."""
    files = {path for paths in named_files(config).values() for path in paths}
    if config_path is not None:
        files.add(config_path)
    absolute = frozenset(path.absolute() for path in files)
    folder = secrets_dir.absolute() if secrets_dir is not None else None
    return WatchSet(absolute, folder)
