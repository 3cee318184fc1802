"""Small JSON files batcher keeps between runs (prices found, limits a server announced).

They live in ``$BATCHER_CACHE_DIR``, else ``$XDG_CACHE_HOME/batcher``, else ``~/.cache/batcher``;
``BATCHER_CACHE_DIR=""`` turns them off. They only save time: a file that cannot be read or
written is ignored. Endpoint URLs are stored without user, password, query or fragment (a key
may hide in any of them); nothing else about a key is stored.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any


def cache_dir() -> Path | None:
    """The folder of batcher's cache files, or ``None`` when turned off."""
    folder = os.environ.get("BATCHER_CACHE_DIR")
    if folder is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        folder = os.path.join(xdg, "batcher")
    return Path(folder) if folder else None


def without_secrets(url: str | None) -> str:
    """The URL without user, password, query or fragment."""
    if not url:
        return ""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class JsonCache:
    """One JSON object in a file, read whole and replaced whole (atomically: runs at once
    each see a whole file; the last writer wins)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def write(self, entries: dict[str, Any]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            partial.write_text(json.dumps(entries, indent=1), encoding="utf-8")
            os.replace(partial, self.path)
        except OSError:
            pass
