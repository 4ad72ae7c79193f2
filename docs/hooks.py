"""MkDocs hooks (registered in mkdocs.yml): the CLI's flag tables come from its parser, and two
files outside docs/ (the model card, the confidence plot) become part of the site.

Markers a page may hold:
- `<!-- commands -->`: a table of every sub-command and its help line;
- `<!-- flags: CMD -->`: the table of CMD's flags (flag, default, help), from
  `captioner.cli.build_parser()`; a command the parser lacks fails the build;
- `<!-- flags: all -->`: a section (heading, help line, table) for every sub-command the page
  has no `<!-- flags: CMD -->` marker for, so a new command is documented the moment it exists;
- `<!-- decoding-settings -->`: the table of `DecodingConfig`'s settings (keyword, flag, default,
  help), from captioner/settings.py;
- `<!-- layers -->`: the package's layers, from captioner/layers.py.

Links from a page to `../assets/FILE` (right when the Markdown is read in the repository) point
to the copy the site carries; the model card's links to `../docs/PAGE` point to the page.

The table functions need only the parser (no MkDocs): tests/test_docs.py calls them directly.
"""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: files outside docs/ that the site carries: site path -> file in the repository
EXTERNAL = {
    "model-card.md": ROOT / "assets" / "MODEL_CARD.md",
    "assets/confidence.png": ROOT / "assets" / "confidence.png",
}
#: what a page in docs/ writes to reach them (relative to docs/) -> the site path
EXTERNAL_LINKS = {"../assets/MODEL_CARD.md": "model-card.md", "../assets/confidence.png": "assets/confidence.png"}

FLAGS = re.compile(r"<!--\s*flags:\s*([\w-]+)\s*-->")
COMMANDS = re.compile(r"<!--\s*commands\s*-->")
SETTINGS = re.compile(r"<!--\s*decoding-settings\s*-->")
LAYERS = re.compile(r"<!--\s*layers\s*-->")
ALL = "all"


class DocsError(Exception):
    """A page that does not fit the parser (it names a command the parser lacks)."""


@functools.cache
def subcommands() -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """Each sub-command of `captioner`, in the parser's order: name -> (help line, its parser)."""
    from captioner.cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    return {name: (helps.get(name, ""), p) for name, p in sub.choices.items()}


def parser_for(command: str) -> argparse.ArgumentParser:
    commands = subcommands()
    if command not in commands:
        raise DocsError(f"no sub-command {command!r} in captioner's parser (it has: {', '.join(commands)})")
    return commands[command][1]


def documented_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions a flag table lists: all but -h and suppressed ones."""
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction) and a.help is not argparse.SUPPRESS]


def flag_rows(command: str) -> list[tuple[str, str, str]]:
    """(flag as --help shows it, default, help) for each of the command's arguments."""
    parser = parser_for(command)
    formatter = argparse.HelpFormatter(parser.prog)  # the plain one: its help is the text as written
    rows = []
    for action in documented_actions(parser):
        if action.option_strings:
            flag = formatter._format_action_invocation(action)
        else:
            flag = formatter._format_args(action, action.dest)
        rows.append((flag, _default(action), formatter._expand_help(action) if action.help else ""))
    return rows


def _default(action: argparse.Action) -> str:
    d = action.default
    if isinstance(action, argparse._StoreTrueAction):
        return "on" if d else "off"
    if isinstance(action, argparse._StoreFalseAction):  # --no-NAME: the switch itself is off unless given
        return "on" if not d else "off"
    if d is None or d is argparse.SUPPRESS:
        return ""
    if isinstance(d, str) and not d:
        return "`''`"
    return f"`{d}`"


def _text(s: str) -> str:
    """Help text as a table cell: Markdown's special characters taken literally."""
    s = s.replace("\\", "\\\\")
    for ch in "`*_[]|":
        s = s.replace(ch, "\\" + ch)
    return s.replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def flag_table(command: str) -> str:
    """The Markdown table of a command's flags."""
    lines = ["| flag | default | help |", "|---|---|---|"]
    lines += [f"| `{flag}` | {default} | {_text(text)} |" for flag, default, text in flag_rows(command)]
    return "\n".join(lines)


def command_table() -> str:
    lines = ["| command | what it does |", "|---|---|"]
    lines += [f"| [`captioner {name}`](cli.md#{slug(name)}) | {_text(h)} |" for name, (h, _) in subcommands().items()]
    return "\n".join(lines)


def settings_table() -> str:
    """The decoding settings: the API's keyword, the CLI's flag, the default, the help."""
    from captioner.settings import DecodingConfig

    lines = ["| keyword | flag | default | most a server request may ask | help |", "|---|---|---|---|---|"]
    for s in DecodingConfig.settings():
        cap = s.serve_max if s.serve_max is not None else s.high
        shown = "" if cap is None else f"`{cap:g}`"
        lines.append(f"| `{s.name}` | `{s.flag}` | `{s.default:g}` | {shown} | {_text(s.help)} |")
    return "\n".join(lines)


def layers_table() -> str:
    """The layers, top first (as a reader meets them), with their modules."""
    from captioner.layers import LAYERS as TABLE

    lines = ["| layer | what it holds | modules |", "|---|---|---|"]
    for name, (modules, what) in reversed(TABLE.items()):
        names = ", ".join(f"`{m}`" for m in modules if m and m != "__main__")
        lines.append(f"| {name} | {_text(what)} | {names} |")
    return "\n".join(lines)


def slug(command: str) -> str:
    """The anchor of a command's section on the CLI page (its heading is `captioner CMD`)."""
    return "captioner-" + command


def command_section(command: str) -> str:
    """A heading, the help line and the flag table: for commands no page describes yet."""
    help_line, _ = subcommands()[command]
    return f"## `captioner {command}`\n\n{_text(help_line[:1].upper() + help_line[1:])}.\n\n{flag_table(command)}"


def expand(markdown: str) -> str:
    """The page with its markers replaced (raises DocsError for a command the parser lacks)."""
    named = {m.group(1) for m in FLAGS.finditer(markdown)} - {ALL}
    for name in named:
        parser_for(name)  # fails for a command the parser lacks

    def flags(m: re.Match) -> str:
        name = m.group(1)
        if name != ALL:
            return flag_table(name)
        rest = [c for c in subcommands() if c not in named]
        return "\n\n".join(command_section(c) for c in rest)

    markdown = COMMANDS.sub(lambda _: command_table(), markdown)
    markdown = SETTINGS.sub(lambda _: settings_table(), markdown)
    markdown = LAYERS.sub(lambda _: layers_table(), markdown)
    return FLAGS.sub(flags, markdown)


# ---- MkDocs events -------------------------------------------------------------------------------


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, path in EXTERNAL.items():
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    from mkdocs.exceptions import PluginError

    if page.file.src_uri == "model-card.md":  # written to be read in assets/: its links to the docs
        return markdown.replace("](../docs/", "](")
    for there, here in EXTERNAL_LINKS.items():
        markdown = markdown.replace(f"]({there}", f"]({here}")
    try:
        return expand(markdown)
    except DocsError as e:
        raise PluginError(f"{page.file.src_uri}: {e}") from e
