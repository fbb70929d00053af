"""The documentation against the tree: README.md's length, the layout listed in docs/architecture.md,
every relative link in README.md and docs/*.md, and the set-up command that CI runs.

Fast: reads files (and asks git which files it ignores); builds no model.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
ARCHITECTURE = DOCS / "architecture.md"
CI = ROOT / ".ci" / "run"

MAX_README_LINES = 400
TOP_LEVEL_FOLDERS = ("libra_fx/", "passes/", "tests/", "examples/", "benchmarks/", "docs/")
SKIPPED_PARTS = {"__pycache__"}


# --- helpers ------------------------------------------------------------------------------------------


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _git(*args: str, stdin: str | None = None) -> str | None:
    """``git <args>`` in the repository root, or ``None`` where git or the repository is missing."""
    if shutil.which("git") is None:
        return None
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    # check-ignore exits with 1 when no path is ignored
    return done.stdout if done.returncode in (0, 1) else None


def _git_ignored(paths: list[str]) -> set[str]:
    if not paths:
        return set()
    out = _git("check-ignore", "--stdin", stdin="\n".join(paths) + "\n")
    return set(out.split("\n")) - {""} if out else set()


def _files_under(folder: str, suffix: str = "") -> set[str]:
    """Files under ``folder`` on disk (and tracked by git), without ``__pycache__``, ``.pyc`` or what git ignores."""
    found = {
        _rel(p) for p in (ROOT / folder).rglob(f"*{suffix}")
        if p.is_file() and not SKIPPED_PARTS & set(p.relative_to(ROOT).parts) and p.suffix != ".pyc"
    }
    tracked = _git("ls-files", "--", folder)
    if tracked is not None:  # a tracked file is on disk unless deleted in the work tree
        found |= {p for p in tracked.split("\n") if p.endswith(suffix) and (ROOT / p).is_file()
                  and not SKIPPED_PARTS & set(p.split("/"))}
    return found - _git_ignored(sorted(found))


def _top_level_folders() -> set[str]:
    """The six folders the layout must name, and any other visible top-level folder git tracks files in."""
    folders = set(TOP_LEVEL_FOLDERS)
    tracked = _git("ls-files")
    if tracked:
        folders |= {p.split("/")[0] + "/" for p in tracked.split("\n")
                    if "/" in p and not p.startswith(".") and (ROOT / p.split("/")[0]).is_dir()}
    return folders


def layout_entries() -> list[str]:
    """The paths of the one ```text block under docs/architecture.md's '## Layout' heading."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = re.search(r"^## Layout[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "docs/architecture.md has no '## Layout' section"
    blocks = re.findall(r"^```text[ \t]*\n(.*?)^```[ \t]*$", section[1], re.M | re.S)
    assert len(blocks) == 1, f"'## Layout' in docs/architecture.md needs exactly one ```text block, found {len(blocks)}"
    paths, malformed = [], []
    for line in blocks[0].splitlines():
        if not line.strip():
            continue
        entry = re.fullmatch(r"(\S+)[ \t]+—[ \t]+\S.*", line)
        if entry is None:
            malformed.append(line)
        else:
            paths.append(entry[1])
    assert not malformed, "layout lines must read 'path  — description':\n" + "\n".join(malformed)
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    assert not duplicates, f"listed twice in the layout: {duplicates}"
    return paths


_FENCE = re.compile(r"^[ \t]{0,3}(```|~~~).*?^[ \t]{0,3}\1[ \t]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
_DEFINITION = re.compile(r"^[ \t]{0,3}\[[^\]]+\]:[ \t]*(<[^>]*>|\S+)", re.M)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def relative_links(path: Path) -> list[str]:
    """The relative targets of ``path``'s markdown links and images, outside code."""
    text = _INLINE_CODE.sub("code", _FENCE.sub("", path.read_text(encoding="utf-8")))
    targets = [m[1] for m in _LINK.finditer(text)] + [m[1] for m in _DEFINITION.finditer(text)]
    targets = [t[1:-1] if t.startswith("<") else t for t in targets]
    return [t for t in targets if t and not t.startswith("#") and not _SCHEME.match(t) and not t.startswith("//")]


def markdown_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# --- tests --------------------------------------------------------------------------------------------


def test_readme_is_at_most_400_lines():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines, at most {MAX_README_LINES}: move the details into a page under docs/")


def test_layout_matches_the_tree():
    listed = layout_entries()
    not_there = [p for p in listed if not ((ROOT / p).is_dir() if p.endswith("/") else (ROOT / p).is_file())]
    required = (_files_under("libra_fx", ".py") | _files_under("benchmarks") | _files_under("examples")
                | _top_level_folders())
    missing = sorted(required - set(listed))
    problems = []
    if not_there:
        problems.append("listed in docs/architecture.md's Layout but not in the tree (folders end with '/', "
                        "files do not): " + ", ".join(not_there))
    if missing:
        problems.append("in the tree but not listed in docs/architecture.md's Layout: " + ", ".join(missing))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: _rel(p))
def test_relative_links_point_to_files(page):
    broken = []
    for target in relative_links(page):
        file = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not file:
            continue
        resolved = (ROOT / file.lstrip("/")) if file.startswith("/") else (page.parent / file)
        resolved = resolved.resolve()
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(target)
    assert not broken, f"{_rel(page)} links to missing files: {broken}"


def test_readme_setup_runs_what_ci_runs():
    ci_lines = [line.strip() for line in CI.read_text(encoding="utf-8").splitlines()]
    commands = [line for line in ci_lines if "pytest" in line and not line.startswith("#")]
    assert commands, ".ci/run runs no pytest command"
    readme = README.read_text(encoding="utf-8")
    setup = re.search(r"^## Set-up\b.*?\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert setup, "README.md has no '## Set-up' section"
    setup_lines = {line.strip() for line in setup[1].splitlines()}
    absent = [c for c in commands if c not in setup_lines]
    assert not absent, f"README.md's set-up section does not give the command .ci/run runs: {absent}"
