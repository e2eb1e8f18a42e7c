"""The docs against the tree: the layout page names exactly what exists, and every relative link lands.

docs/layout.md must name every module of the package and every file of launch/, configs/,
benchmarks/ and docker/, and nothing that does not exist; README.md and docs/*.md must link only
to files and headings that exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYOUT = REPO / "docs" / "layout.md"
# Folders whose every file (and subfolder) the layout page must name; the package is checked module by module.
LISTED_FOLDERS = ("launch", "configs", "benchmarks", "docker")
SKIPPED_NAMES = {"__pycache__", ".pytest_cache"}

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+).+?\1", re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def layout_block(text: str) -> str:
    """The first fenced block of the layout page: the tree."""
    match = re.search(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert match, f"{LAYOUT.relative_to(REPO)} has no fenced block with the tree"
    return match.group(1)


def named_paths(block: str) -> list[str]:
    """Repository-relative paths the tree names: an indented name (two spaces a level) is inside the folder above it."""
    folders: list[str] = []
    paths = []
    for number, line in enumerate(block.splitlines(), 1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        depth = indent // 2
        assert indent % 2 == 0 and depth <= len(folders), f"layout line {number} is indented oddly: {line!r}"
        name = line.split()[0]
        path = (folders[depth - 1] if depth else "") + name
        folders = folders[:depth] + ([path] if name.endswith("/") else [])
        paths.append(path)
    return paths


def required_paths(repo: Path) -> set[str]:
    """What the layout page must name: every module of the package (a package by its folder), and all of LISTED_FOLDERS."""
    required = set()
    for module in (repo / "flowers_dist").rglob("*.py"):
        rel = module.relative_to(repo)
        if SKIPPED_NAMES & set(rel.parts):
            continue
        required.add(f"{rel.parent.as_posix()}/" if module.name == "__init__.py" else rel.as_posix())
    for folder in LISTED_FOLDERS:
        for child in (repo / folder).iterdir():
            if child.name in SKIPPED_NAMES or child.suffix == ".pyc":
                continue
            rel = child.relative_to(repo).as_posix()
            required.add(rel + "/" if child.is_dir() else rel)
    return required


def exists(repo: Path, path: str) -> bool:
    target = repo / path.rstrip("/")
    return target.is_dir() if path.endswith("/") else target.is_file()


def test_layout_names_every_module_and_listed_file():
    named = set(named_paths(layout_block(LAYOUT.read_text())))
    missing = sorted(required_paths(REPO) - named)
    assert not missing, "docs/layout.md does not name these; add a line for each: " + ", ".join(missing)


def test_layout_names_only_files_that_exist():
    extra = sorted(p for p in named_paths(layout_block(LAYOUT.read_text())) if not exists(REPO, p))
    assert not extra, "docs/layout.md names these, which do not exist; remove or rename their lines: " + ", ".join(
        extra
    )


def test_layout_parser_reads_nesting():
    block = "a/   x\n  b.py   y\n  c/   z\n    d.py\n  e.py\nf.txt\n"
    assert named_paths(block) == ["a/", "a/b.py", "a/c/", "a/c/d.py", "a/e.py", "f.txt"]


def test_required_paths_reads_the_tree(tmp_path):
    for rel in (
        "flowers_dist/__init__.py",
        "flowers_dist/a.py",
        "flowers_dist/sub/__init__.py",
        "flowers_dist/sub/b.py",
        "flowers_dist/__pycache__/a.cpython-312.py",
        "launch/run.sh",
        "configs/x.yaml",
        "benchmarks/results/r.json",
        "docker/Dockerfile",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert required_paths(tmp_path) == {
        "flowers_dist/",
        "flowers_dist/a.py",
        "flowers_dist/sub/",
        "flowers_dist/sub/b.py",
        "launch/run.sh",
        "configs/x.yaml",
        "benchmarks/results/",
        "docker/Dockerfile",
    }


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(markdown: str) -> list[str]:
    """Link targets outside code that point into the repository (no scheme)."""
    prose = CODE_SPAN.sub("", FENCE.sub("", markdown))
    return [t for t in LINK.findall(prose) if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", t)]


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """The page's relative links whose file, or whose heading in a Markdown file, does not exist."""
    broken = []
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target} (no heading with anchor #{anchor} in {file.relative_to(root)})")
    return broken


DOC_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_land(page):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(REPO)} has broken links: " + "; ".join(broken)


def test_readme_links_every_docs_page():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in relative_links((REPO / "README.md").read_text())}
    unlinked = sorted(p.name for p in (REPO / "docs").glob("*.md") if p.resolve() not in linked)
    assert not unlinked, "README.md's reading list misses docs pages: " + ", ".join(unlinked)


def test_link_checker_sees_a_broken_file_and_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Exit codes\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#exit-codes) [gone](missing.md) [bad](other.md#not-a-heading) "
        "[web](https://example.com) `[code](nowhere.md)`\n"
    )
    links = relative_links(page.read_text())
    assert links == ["other.md#exit-codes", "missing.md", "other.md#not-a-heading"]
    assert anchors((tmp_path / "other.md").read_text()) == {"exit-codes"}
    assert broken_links(page, tmp_path) == [
        "missing.md (no such file)",
        "other.md#not-a-heading (no heading with anchor #not-a-heading in other.md)",
    ]
    assert slug("Mixed precision and `torch.compile`") == "mixed-precision-and-torchcompile"
