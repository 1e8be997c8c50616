"""Config sources hidden from tests that load a config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.config import loader
from appliance.reload import reloader


def isolate_config_sources(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Hide the caller's APPLIANCE_* variables and the real default file and folder.

    The defaults are replaced by paths under `folder` that do not exist.
    """
    for name in list(os.environ):
        if name.upper().startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    absent_secrets = folder / "run" / "absent"
    monkeypatch.setattr(loader, "DEFAULT_CONFIG_PATH", folder / "etc" / "absent.yaml")
    monkeypatch.setattr(loader, "DEFAULT_SECRETS_DIR", absent_secrets)
    monkeypatch.setattr(reloader, "DEFAULT_SECRETS_DIR", absent_secrets)
