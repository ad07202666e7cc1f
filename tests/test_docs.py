"""The project's own documentation (docs/): it covers what the code defines and every link resolves."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set:
    return {_anchor(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name}: no heading for #{anchor} in {linked.name}"


def test_training_page_lists_every_config_key_with_its_default():
    from fastgan.train.config import Config

    text = (DOCS / "training.md").read_text()
    for key, default in Config().to_dict().items():
        shown = default if isinstance(default, str) else json.dumps(default)
        assert f"| `{key}` | `{shown}` |" in text, f"docs/training.md: {key} (default {shown})"


def test_the_study_page_names_the_keys_outside_a_trials_identity():
    from fastgan.train.study import PRESENTATION_KEYS

    text = (DOCS / "study.md").read_text()
    assert all(f"`{key}`" in text for key in PRESENTATION_KEYS)


def test_every_docs_page_is_in_the_index():
    index = (DOCS / "README.md").read_text()
    assert all(f"({page.name})" in index for page in DOCS.glob("*.md") if page.name != "README.md")


def test_nothing_points_outside_the_repository_for_its_documentation():
    """The formulas used to be cited from a specification that is not part of the repository."""
    files = [ROOT / "README.md", *ROOT.glob("configs/**/*.yaml"), *ROOT.glob("fastgan/**/*.py"), *DOCS.glob("*.md")]
    offenders = [str(f.relative_to(ROOT)) for f in files if "SPEC.md" in f.read_text()]
    assert offenders == []
