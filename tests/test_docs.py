"""docs/ is part of the interface: its config reference is generated from the code and must match it."""

import difflib
from pathlib import Path

import pytest

from keel.cli import main

ROOT = Path(__file__).parent.parent
CONFIG_DOC = ROOT / "docs" / "config.md"
REGENERATE = ".venv/bin/keel config --markdown > docs/config.md"


def test_config_reference_matches_the_config(capsys):
    assert main(["config", "--markdown"]) == 0
    generated = capsys.readouterr().out
    written = CONFIG_DOC.read_text() if CONFIG_DOC.is_file() else ""
    if written != generated:
        diff = difflib.unified_diff(
            written.splitlines(), generated.splitlines(), "docs/config.md", "keel config --markdown", lineterm="", n=0
        )
        pytest.fail(
            f"docs/config.md is out of date with the config's help strings; regenerate it with "
            f"`{REGENERATE}` and commit it.\n" + "\n".join(list(diff)[:40]),
            pytrace=False,
        )


def test_readme_links_the_reference_and_the_figures():
    readme = (ROOT / "README.md").read_text()
    for doc in ("docs/config.md", "docs/benchmarks.md"):
        assert f"]({doc})" in readme, f"README.md has no link to {doc}"
