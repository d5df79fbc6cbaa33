"""The documentation builds cleanly, the README stays short, and nothing cites a file users lack.

`mkdocs build --strict` (mkdocs.yml turns every link, anchor and nav problem into a warning)
fails on a broken link or a page missing from the nav; a planted broken link shows that the
check bites. The project's own copies of the contract, the dataset layouts and the architecture
notes are docs/contract.md, docs/data.md and docs/architecture.md: a user who clones the
repository has no other, so README, docs, code and tests must cite those.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300

# Files that lived beside the project while it was built, and the pages that replace them.
# Spelled in pieces so that this file does not cite them itself.
OUTSIDE_FILES = {
    "CONTRACT" + ".md": "docs/contract.md",
    "DATASETS" + ".md": "docs/data.md",
    "ARCHITECTURE" + ".md": "docs/architecture.md",
}
SCANNED = ["README.md", "docs", "src", "components", "pipelines", "tests", "benchmarks", "scripts"]
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg"}


def _mkdocs_build(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    # No --quiet: it drops warnings before --strict counts them, and the build would pass.
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=config_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docs_build_strict(tmp_path):
    result = _mkdocs_build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index.html", "contract/index.html", "architecture/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    home = (tmp_path / "site" / "index.html").read_text()
    # the README's results and command table are included, not left as snippet markers
    assert "gallery_50 mAP" in home and "psearch extract-merge" in home
    assert "<p>--8&lt;--" not in home


@pytest.mark.parametrize(
    ("page", "bad_link"),
    [
        ("models.md", "[gone](no-such-page.md)"),
        ("data.md", "[gone](contract.md#no-such-section)"),
    ],
    ids=["missing page", "missing anchor"],
)
def test_a_broken_link_fails_the_build(tmp_path, page, bad_link):
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "docs", tree / "docs")
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "benchmarks", tree / "benchmarks", ignore=shutil.ignore_patterns("*.py"))
    target = tree / "docs" / page
    target.write_text(target.read_text() + f"\n{bad_link}\n")
    result = _mkdocs_build(tree, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such" in result.stdout + result.stderr


def test_readme_is_short_and_links_into_docs_relatively():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    docs_links = [t for t in targets if t.startswith("docs/")]
    assert docs_links, "the README must map the docs"
    for target in targets:
        if target.startswith(("http://", "https://", "#")):
            continue
        assert not target.startswith("/"), f"README links {target}: use a relative link"
        path = target.split("#", 1)[0]
        assert (ROOT / path).exists(), f"README links {target}, which does not exist"
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    linked = {Path(t.split("#", 1)[0]).name for t in docs_links}
    assert pages <= linked, f"README's map of the docs misses {sorted(pages - linked)}"


def _text_files():
    for name in SCANNED:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in files:
            if f == Path(__file__).resolve() or not f.is_file():
                continue
            if f.suffix not in TEXT_SUFFIXES or any(
                part.endswith(".egg-info") or part == "__pycache__" for part in f.parts
            ):
                continue
            yield f


def test_nothing_cites_files_users_do_not_have():
    found = []
    for f in _text_files():
        text = f.read_text(errors="replace")
        for name, page in OUTSIDE_FILES.items():
            # docs/contract.md etc. are lower case, so they never match these upper-case names
            for lineno, line in enumerate(text.splitlines(), 1):
                if name in line:
                    found.append(f"{f.relative_to(ROOT)}:{lineno}: cites {name}; cite {page}")
    assert not found, "\n".join(found)
