"""The documentation (issue 26): generated pages agree with the code, the site builds strictly,
every page is in the navigation, README is a front door whose links resolve, and the results
pages' copies of the experiments' tables agree with what the scripts wrote."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages() -> list[str]:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)
    pages = []

    def walk(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            walk(value) if isinstance(value, list) else pages.append(value)

    walk(config["nav"])
    return pages


def test_generated_reference_pages_match_the_code():
    stale = _generator().stale_pages()
    assert not stale, f"{[str(p.relative_to(ROOT)) for p in stale]} differ from the code: run python docs/generate.py"


def test_the_config_reference_names_every_key_and_its_range():
    from agnews_lora import config, registry

    page = (DOCS / "reference" / "config.md").read_text()
    for section in ("data", "model", "lora", "train", "sweep"):
        assert f"\n## {section}\n" in page
        for f in config.dataclasses.fields(getattr(config.Config(), section)):
            assert f"| `{section}.{f.name}` |" in page
    for method in registry.METHODS.values():
        if method.options:
            assert f"\n## peft.{method.name}\n" in page
    assert "| `train.lr` | float | `0.0002` | must be > 0 | peak learning rate of AdamW |" in page


def test_the_cli_reference_has_every_subcommand_and_option():
    from agnews_lora.cli import build_parser

    page = (DOCS / "reference" / "cli.md").read_text()
    help_text = subprocess.run([sys.executable, "-m", "agnews_lora.cli", "--help"], capture_output=True,
                               text=True, check=True).stdout
    commands = re.search(r"\{([a-z,]+)\}", help_text).group(1).split(",")
    for name in commands:
        assert f"\n## {name}\n" in page
    for name, _help, sub in _generator()._subcommands(build_parser()):
        section = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in section, f"{name} {option} is missing from its section"


def test_every_page_is_in_the_navigation_and_every_nav_entry_exists():
    nav = set(_nav_pages())
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages - nav == set(), "pages outside the navigation"
    assert nav - pages == set(), "navigation entries without a page"


@pytest.mark.skipif(shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "Classifier" in api and "load_config" in api  # mkdocstrings rendered the docstrings


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r'pip install --quiet -e "(\.\[[a-z,]+\])"', ci).group(1)
    assert "pip install torch==2.13.0" in text and f'pip install -e "{install}"' in text
    assert re.search(r"^python -m pytest -q$", ci, re.M) and "python -m pytest -q" in text
    assert "agnews-lora train --config configs/cpu-minilm.yaml" in text


def _anchors(page: Path) -> set[str]:
    """The heading ids mkdocs (toc, default slugify) gives a page's headings."""
    ids = set()
    for line in page.read_text().splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*$", line)
        if m:
            text = re.sub(r"[`*_\[\]()]", "", m.group(1)).strip().lower()
            ids.add(re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", text)))
    return ids


def test_every_relative_link_in_readme_resolves():
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, "README links to the documentation"
    for link in links:
        if re.match(r"^[a-z]+://", link) or link.startswith("#"):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links {link}, which does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"README links {link}: no such heading"


def _tables(text: str) -> dict[str, list[str]]:
    """header row -> body rows of each Markdown table in `text`."""
    tables, lines = {}, text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]) and (i == 0 or not lines[i - 1].startswith("|")):
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                body.append(row)
            tables[line] = body
    return tables


def test_results_pages_copy_the_scripts_tables_exactly():
    generated = DOCS / "results" / "generated"
    pages = [p for p in (DOCS / "results").glob("*.md")]
    checked = 0
    for output in generated.glob("*.md"):
        for header, rows in _tables(output.read_text()).items():
            for page in pages:
                copy = _tables(page.read_text()).get(header)
                if copy is not None:
                    checked += 1
                    # the page may bold its best figures; every number must be the script's
                    assert [r.replace("**", "") for r in copy] == [r.replace("**", "") for r in rows], f"{page.relative_to(ROOT)} copies a table of {output.relative_to(ROOT)} " \
                                         "that the script has since rewritten: copy it again"
    assert checked >= 5


def test_the_architecture_picture_agrees_with_the_import_graph():
    """docs/design/index.md draws the modules in rows; every import points to the same row or below."""
    from test_imports import import_graph

    page = (DOCS / "design" / "index.md").read_text()
    picture = page.split("## The architecture in one picture", 1)[1].split("```", 2)[1]
    row_of, row = {}, -1
    for line in picture.splitlines():
        if not line.strip() or set(line.strip()) <= {"─"}:
            continue
        if not line.startswith(" " * 17):  # a new row starts with its name in the first column
            row += 1
        for name in re.findall(r"\b([a-z_]+)\b", line[17:]):
            row_of.setdefault(name, row)
    graph = import_graph()
    missing = set(graph) - set(row_of) - {"__init__"}
    assert not missing, f"modules missing from the picture: {sorted(missing)}"
    upward = [(m, d) for m, deps in graph.items() for d in deps if m in row_of and row_of[d] < row_of[m]]
    assert not upward, f"imports pointing up the picture: {upward}"
