"""Every relative link and #anchor in the repository's Markdown pages resolves (issue 40): README.md,
docs/, images/README.md and results/*/README.md. Anchors follow GitHub's rules for headings. And the
README stays a front door: short, the two commands near the top, every docs/ page linked."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).parents[1]
PAGES = sorted({ROOT / "README.md", ROOT / "images" / "README.md", *(ROOT / "docs").rglob("*.md"),
                *(ROOT / "results").rglob("README.md")})
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The page without its fenced code blocks (a `#` or a link there is code, not Markdown)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text without markup, lower case, punctuation other than
    hyphens, underscores and spaces dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(page.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(INLINE_CODE.sub("", prose(page.read_text())))


def dead_links(page: Path) -> list[str]:
    """The page's relative links whose file or heading does not exist."""
    dead = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...: not checked here
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / unquote(path)).resolve() if path else page
        if not resolved.exists():
            dead.append(f"{target} (no {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved})")
        elif anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
            dead.append(f"{target} (no heading #{anchor} in {resolved.relative_to(ROOT)})")
    return dead


def test_the_pages_are_found():
    assert ROOT / "README.md" in PAGES and ROOT / "docs" / "recipe.md" in PAGES
    assert ROOT / "results" / "cpu-reference-v1" / "README.md" in PAGES


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    assert not dead_links(page)


def test_githubs_anchor_rules():
    assert slug("What happens when things go wrong") == "what-happens-when-things-go-wrong"
    assert slug("What the first full run at the defaults says (CPU, 2026-12-01)") == \
        "what-the-first-full-run-at-the-defaults-says-cpu-2026-12-01"
    assert slug("Which learning rate? The range test") == "which-learning-rate-the-range-test"
    assert slug("The chosen rate at the real width (`full-width`)") == "the-chosen-rate-at-the-real-width-full-width"
    assert slug("In [Colab](https://colab.research.google.com)") == "in-colab"


def test_a_dead_link_or_anchor_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Twice\n\n## Twice\n\n```\n## not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md) [ok](docs/a.md#twice-1) [ok](#top) [web](https://example.com)\n"
                    "`[code](nowhere.md)`\n\n# Top\n\n"
                    "[gone](docs/b.md) [bad anchor](docs/a.md#twice-2) [code heading](docs/a.md#not-a-heading)\n")
    assert dead_links(page) == ["docs/b.md (no docs/b.md)", "docs/a.md#twice-2 (no heading #twice-2 in docs/a.md)",
                                "docs/a.md#not-a-heading (no heading #not-a-heading in docs/a.md)"]


# --- the README as a front door ----------------------------------------------------------------------
def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.split()) <= 1500, f"README.md has {len(text.split())} words (wc -w); at most 1,500"
    top = "\n".join(text.splitlines()[:40])
    assert "bash scripts/train.sh" in top and "bash scripts/test.sh" in top


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / unquote(t.partition("#")[0])).resolve() for t in links(ROOT / "README.md")}
    pages = sorted((ROOT / "docs").glob("*.md"))
    missing = [p.relative_to(ROOT).as_posix() for p in pages if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_ci_finds_the_suites_time_limit_in_the_readme():
    """.ci/run reads the limit from the README with its own sed line; run that line as it is."""
    (line,) = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.startswith("limit_min=")]
    found = subprocess.run(["bash", "-c", f"{line}; echo \"$limit_min\""], cwd=ROOT, capture_output=True, text=True,
                           check=True, timeout=10).stdout.strip()
    assert found.isdigit() and 5 <= int(found) <= 30, found
