"""The documentation holds together: the README stays short and in a newcomer's order, every
relative link in it and in docs/ resolves (file and heading), and the example jobs and sample
inputs are described where they are used."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

#: The README's sections, in the order a newcomer needs them.
README_SECTIONS = [
    "Install",
    "Quick start",
    "A real endpoint",
    "Input",
    "Output columns",
    "Unattended runs: notices and logs",
    "Exit codes",
    "Python API",
    "More",
]
README_MAX_LINES = 250

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _pages() -> list[Path]:
    """The user documentation: the README and docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


#: Other Markdown whose links must resolve too.
OTHER_PAGES = [ROOT / name for name in ("DESIGN_NOTES.md", "CHANGELOG.md", "bench/README.md")]


def _prose(path: Path) -> str:
    """The page without its code blocks (a link-like text in code is not a link)."""
    return _FENCE.sub("", path.read_text(encoding="utf-8"))


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in _HEADING.findall(_prose(path))}


def relative_links(path: Path) -> list[str]:
    return [
        target
        for target in _LINK.findall(_prose(path))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


def broken_links(path: Path) -> list[str]:
    """The relative links of ``path`` whose file, or heading in that file, does not exist."""
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


def test_slug_matches_github_anchors() -> None:
    assert slug("Output columns") == "output-columns"
    assert slug("llama.cpp (llama-cpp-python)") == "llamacpp-llama-cpp-python"
    assert slug("Ray Data: `--engine ray`") == "ray-data---engine-ray"


def test_broken_links_are_found(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok too](there.md#a-heading) [web](https://example.com/x)\n"
        "[gone](missing.md) [no heading](there.md#nope)\n"
        "```\n[in code](ignored.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "there.md#nope: no heading #nope in there.md",
    ]


@pytest.mark.parametrize("page", [*_pages(), *OTHER_PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_readme_is_short_and_in_order() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    sections = re.findall(r"^## (.+?)\s*$", _FENCE.sub("", text), re.MULTILINE)
    assert sections == README_SECTIONS


def test_every_doc_is_in_the_index() -> None:
    index = DOCS / "README.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in relative_links(index)}
    pages = {p.resolve() for p in DOCS.glob("*.md")} - {index.resolve()}
    assert sorted(p.name for p in pages - linked) == []


def test_example_jobs_and_sample_data_are_described() -> None:
    docs = "\n".join(p.read_text(encoding="utf-8") for p in _pages())
    examples = [*sorted((ROOT / "jobs").glob("*.toml")), *sorted((ROOT / "sample_data").iterdir())]
    assert examples
    undescribed = [
        str(p.relative_to(ROOT)) for p in examples if str(p.relative_to(ROOT)) not in docs
    ]
    assert undescribed == []


def _module_map() -> set[str]:
    """The modules named in the first column of DESIGN_NOTES.md's "Layout of the code" table."""
    text = (ROOT / "DESIGN_NOTES.md").read_text(encoding="utf-8")
    section = text.split("## Layout of the code", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([\w/]+\.py)` \|", section, re.MULTILINE))


def test_design_notes_map_names_every_module() -> None:
    package = ROOT / "batcher"
    modules = {
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        # a subpackage's __init__ is mapped when it holds code, not just its docstring
        if not (p.name == "__init__.py" and p.parent != package and _docstring_only(p))
    }
    listed = _module_map()
    assert sorted(modules - listed) == []  # every module has its line
    assert sorted(listed - modules) == []  # and every line a module


def test_quick_start_has_the_two_commands_and_the_fast_loop() -> None:
    text = README.read_text(encoding="utf-8")
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    for command in (
        "pip install -e . && batcher run jobs/demo.toml",
        "pip install -e '.[test]' && python -m pytest -q",
        'python -m pytest -m "not slow"',
    ):
        assert command in quick_start
    assert (ROOT / "jobs" / "demo.toml").is_file()


def _docstring_only(path: Path) -> bool:
    """Whether a module holds nothing but its docstring (a subpackage's one-line ``__init__``)."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return len(body) <= 1 and all(isinstance(node, ast.Expr) for node in body)
