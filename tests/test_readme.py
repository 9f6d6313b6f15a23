"""The README is part of the interface: it must document every config key and every command."""

from pathlib import Path

from keel.cli import build_parser
from keel.config import reference

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_config_key_is_documented():
    missing = [key for key, _, _ in reference() if f"`{key}`" not in README]
    assert not missing, f"README config reference lacks {missing}"


def test_every_command_is_documented():
    commands = build_parser()._subparsers._group_actions[0].choices
    missing = [name for name in commands if f"keel {name}" not in README]
    assert not missing, f"README lacks commands {missing}"
