"""Where genai-lab keeps a user's own state (conversations, background jobs): one folder,
found one way. Torch-free, so a small process (the dashboard's job runner) can import it."""

from __future__ import annotations

import os
from pathlib import Path

APP = "genai-lab"


def user_data_dir() -> Path:
    """The user's genai-lab data folder: platformdirs' answer if it is installed, else
    $XDG_DATA_HOME or ~/.local/share, then genai-lab/. (Not created here.)"""
    try:
        from platformdirs import user_data_dir as platform_data_dir

        return Path(platform_data_dir(APP, appauthor=False))
    except ImportError:
        xdg = os.environ.get("XDG_DATA_HOME")
        return (Path(xdg) if xdg else Path.home() / ".local" / "share") / APP


def user_data_path(name: str, env: str) -> Path:
    """$`env` if set (tests, several installs side by side), else `name` in the data folder."""
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    return user_data_dir() / name
