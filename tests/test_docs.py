"""README and docs/: user documentation that stays true: short README, working example, live links, no dev notes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "results" / "README.md"]


def _prose(path: Path) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)


def test_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text()
    assert len(text.split()) <= 1600, len(text.split())
    assert "## Set-up: two commands" in text and "make test" in text and "make bench" in text
    # The import name is shared with Hugging Face's `kernels` package: the install section says so.
    install = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "Hugging Face" in install and "`kernels`" in install


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if link.startswith(("http://", "https://", "#")):
            continue
        assert (page.parent / link.split("#")[0]).exists(), f"{page.name}: dead link {link}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_commit_hashes_in_prose(page):
    """Provenance lives in the results files; prose names the file, not a commit."""
    words = re.findall(r"\b[0-9a-f]{7,40}\b", _prose(page))
    hashes = [w for w in words if re.search(r"[a-f]", w) and re.search(r"[0-9]", w)]
    assert not hashes, hashes


def test_figures_name_their_results_file():
    """Each chart shown is the one drawn from the .jsonl beside it, and the text names that file."""
    for page in PAGES:
        text = page.read_text()
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text):
            log = Path(image).with_suffix(".jsonl").name
            assert (page.parent / image).exists() and log in text, (page.name, image)


def test_readme_example_runs():
    example = re.search(r"## Example\n+```python\n(.*?)```", README.read_text(), flags=re.DOTALL).group(1)
    result = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch" in result.stdout
