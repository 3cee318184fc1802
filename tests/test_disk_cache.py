"""The small JSON files kept between runs (``batcher.disk_cache``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from batcher.disk_cache import JsonCache, cache_dir, without_secrets


def test_the_cache_folder_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHER_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("BATCHER_CACHE_DIR", "")
    assert cache_dir() is None  # turned off
    monkeypatch.delenv("BATCHER_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "batcher"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "batcher"


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("https://user:sk-secret@api.example.com:8443/v1?key=sk-2#frag",
         "https://api.example.com:8443/v1"),
        ("http://localhost/v1", "http://localhost/v1"),
        ("", ""),
        (None, ""),
    ],
)  # fmt: skip
def test_urls_are_stored_without_anything_a_key_may_hide_in(url: str | None, kept: str) -> None:
    assert without_secrets(url) == kept


def test_a_cache_file_round_trips_and_is_replaced_whole(tmp_path: Path) -> None:
    cache = JsonCache(tmp_path / "sub" / "prices.json")
    assert cache.read() == {}  # no file yet
    cache.write({"a": {"input": 1.5}})
    cache.write({"b": [1, 2]})
    assert cache.read() == {"b": [1, 2]}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["prices.json"]  # no leftovers


@pytest.mark.parametrize("text", ["not json", "[1, 2]", "", '"a string"'])
def test_a_file_that_is_not_an_object_reads_as_empty(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(text, encoding="utf-8")
    assert JsonCache(path).read() == {}


def test_a_cache_that_cannot_be_written_is_ignored(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = JsonCache(blocker / "c.json")  # its folder is a file
    cache.write({"a": 1})  # no error: the cache only saves time
    assert cache.read() == {}
