"""The documentation site (mkdocs.yml, docs/) and the README that points into it: every page is in the nav,
every page the nav names exists, and every README link to a file of the repository (a docs page included)
lands on one. Quick and offline; `scripts/test.sh` builds the site itself with `mkdocs build --strict`."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


def _mkdocs() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_every_docs_page_is_in_the_nav_and_every_nav_page_exists():
    config = _mkdocs()
    docs = ROOT / config.get("docs_dir", "docs")
    nav = _nav_pages(config["nav"])
    on_disk = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*.md"))
    assert sorted(set(on_disk) - set(nav)) == [], "docs pages missing from mkdocs.yml's nav"
    assert sorted(set(nav) - set(on_disk)) == [], "mkdocs.yml's nav names pages that do not exist"
    assert len(nav) == len(set(nav)), "a page is in the nav twice"


def test_readme_links_point_at_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    targets = [t for t in LINK.findall(readme) if not re.match(r"[a-z]+:", t)]
    assert any(t.startswith("docs/") for t in targets), "the README links into docs/"
    missing = [t for t in targets if not (ROOT / t.partition("#")[0]).exists()]
    assert missing == [], f"README links to files that do not exist: {missing}"
    anchors = [t for t in targets if "#" in t and t.partition("#")[0].endswith(".md")]
    lost = [t for t in anchors if t.rpartition("#")[2] not in _anchors((ROOT / t.partition("#")[0]).read_text())]
    assert lost == [], f"README links to anchors that are not on the page: {lost}"


def _anchors(markdown: str) -> set[str]:
    """A page's heading ids: an explicit `{#id}`, else the toc extension's slug of the heading."""
    ids = set(re.findall(r"\{#([\w-]+)\}", markdown))
    prose = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    for heading in re.findall(r"^#+ (.*)$", prose, flags=re.MULTILINE):
        text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
        ids.add(re.sub(r"[-\s]+", "-", text))
    return ids


def test_readme_keeps_the_two_commands_at_the_top():
    readme = (ROOT / "README.md").read_text()
    first_blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL)[:2]
    assert first_blocks == ["pip install -e . && orchestrator run\n", "bash scripts/test.sh\n"]


def test_the_readmes_pipeline_example_is_the_340b_sdg_file():
    """The README's Pipelines section shows examples/pipeline_sdg_340b.yaml's stages as they are."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Pipelines"):]
    start = section.index("```yaml") + len("```yaml")
    shown = yaml.safe_load(section[start:section.index("```", start)])
    assert shown == yaml.safe_load((ROOT / "examples" / "pipeline_sdg_340b.yaml").read_text())
