"""The manual: README.md is a front door (at most 250 lines), the pages in docs/ are all in the
site's navigation, every flag table is generated from the CLI's parser (docs/hooks.py), and the
site builds with `mkdocs build --strict` where MkDocs is installed (docs/requirements.txt)."""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SETUP_COMMANDS = (
    "python -m pip install -r requirements.txt && python -m pip install -e . && captioner caption assets/examples",
    "python -m pip install -r requirements.txt && python -m pip install -e . && python -m pytest -q",
)


def _hooks():
    spec = importlib.util.spec_from_file_location("captioner_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()


def _pages() -> dict[str, str]:
    return {p.relative_to(DOCS).as_posix(): p.read_text(encoding="utf-8") for p in DOCS.rglob("*.md")}


def _nav() -> list[str]:
    """The pages mkdocs.yml's nav names (read as text: no YAML parser needed)."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text[text.index("\nnav:") :]
    return re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.M)


def test_the_readme_is_a_front_door_with_the_two_set_up_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for command in SETUP_COMMANDS:
        assert command in readme
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    nav, pages = _nav(), set(_pages())
    assert pages <= set(nav), sorted(pages - set(nav))
    assert set(nav) <= pages | set(hooks.EXTERNAL), sorted(set(nav) - pages - set(hooks.EXTERNAL))
    assert all(path.is_file() for path in hooks.EXTERNAL.values())


def test_every_flags_marker_names_a_sub_command():
    commands = set(hooks.subcommands())
    for name, text in _pages().items():
        for command in hooks.FLAGS.findall(text):
            assert command == hooks.ALL or command in commands, f"{name}: {command}"


def test_every_sub_command_has_a_flag_table_on_the_cli_page():
    cli = _pages()["cli.md"]
    named = set(hooks.FLAGS.findall(cli))
    assert hooks.ALL in named or set(hooks.subcommands()) <= named
    expanded = hooks.expand(cli)
    for command in hooks.subcommands():
        assert f"## `captioner {command}`" in expanded, command


@pytest.mark.parametrize("command", list(hooks.subcommands()))
def test_a_generated_flag_table_lists_exactly_the_parsers_flags(command):
    parser = hooks.subcommands()[command][1]
    rows = hooks.flag_table(command).splitlines()[2:]
    flags_in_table = {f for row in rows for f in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", row.split("|")[1])}
    shown = [a for a in parser._actions if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]
    assert flags_in_table == {o for a in shown for o in a.option_strings}  # every flag --help shows, but -h
    assert len(rows) == len(shown)  # the positionals too


def test_a_page_naming_a_command_the_parser_lacks_fails():
    with pytest.raises(hooks.DocsError, match="no-such-command"):
        hooks.expand("<!-- flags: no-such-command -->")


def test_the_loop_marker_covers_the_commands_the_page_does_not_name():
    page = hooks.expand("<!-- flags: caption -->\n\n<!-- flags: all -->")
    assert "## `captioner caption`" not in page
    for command in set(hooks.subcommands()) - {"caption"}:
        assert f"## `captioner {command}`" in page


def test_the_site_builds_in_strict_mode(tmp_path):
    missing = [m for m in ("mkdocs", "material") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: pip install -r docs/requirements.txt")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    cli = (tmp_path / "site" / "cli" / "index.html").read_text(encoding="utf-8")
    assert "--beam-size" in cli and "<!-- flags" not in cli
    assert (tmp_path / "site" / "model-card" / "index.html").is_file()
