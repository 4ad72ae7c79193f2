"""README.md's examples are what the commands it shows print (the bundled model, no flags).

The expected text is read from README.md (and the Getting started page, which prints the same
captions), never copied here: when behaviour and the docs drift apart, this fails.
"""

from __future__ import annotations

import re
import shlex

import pytest

from captioner.cli import main
from captioner.images import list_images

from .conftest import REPO

README = REPO / "README.md"
GETTING_STARTED = REPO / "docs" / "getting-started.md"


def code_blocks(path, language: str = "") -> list[str]:
    """The fenced code blocks of a Markdown file in `language` ("" for plain ```), a list item's unindented."""
    blocks, body, indent, info = [], None, 0, ""
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = line.lstrip().startswith("```")
        if body is None and fence:
            body, indent, info = [], len(line) - len(line.lstrip()), line.strip()[3:]
        elif body is not None and fence:
            if info == language:
                blocks.append("".join(x[indent:] + "\n" for x in body))
            body = None
        elif body is not None:
            body.append(line)
    return blocks


def first_caption_command() -> list[str]:
    """The arguments of the `captioner caption ...` that ends the README's first set-up command."""
    setup = code_blocks(README, "bash")[0]
    command = setup.split("&&")[-1].strip()
    assert command.startswith("captioner caption "), command
    return shlex.split(command)[1:]


def printed_examples(path) -> list[list[str]]:
    """The fields of each line the doc shows that command printing (tabs shown as runs of spaces)."""
    blocks = [b for b in code_blocks(path) if b.startswith("assets/examples/")]
    assert len(blocks) == 1, f"{path.name}: one block of the example photos' captions, not {len(blocks)}"
    return [re.split(r" {2,}", line) for line in blocks[0].splitlines() if line.strip()]


@pytest.fixture
def at_repo_root(monkeypatch):
    """Where the README's commands run (its paths are relative), with the bundled model."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("CAPTIONER_MODEL", raising=False)


def test_the_readmes_example_captions_and_marks_are_what_its_first_command_prints(at_repo_root, capsys):
    """Captions, "(low confidence: x)" marks and the tags after them, line for line, for every photo."""
    args = first_caption_command()
    assert main(args) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == len(list_images(REPO / "assets" / "examples"))  # every photo
    assert any(len(fields) > 2 and fields[2].startswith("(low confidence: ") for fields in printed)
    for doc in (README, GETTING_STARTED):
        shown = printed_examples(doc)
        assert shown == printed, (
            "\n".join(f"{doc.name}: {'  '.join(s)}\nprinted: {'  '.join(p)}" for s, p in zip(shown, printed) if s != p)
            or f"{doc.name}: {len(shown)} lines, printed {len(printed)}"
        )


def test_the_readmes_python_example_returns_what_it_shows(at_repo_root):
    """The README's Python block, run a line at a time; each `# -> ...` is the repr of the line
    above it, "..." standing for the rest of a tuple."""
    block = next(b for b in code_blocks(README, "python") if "from captioner import Captioner" in b)
    lines = block.splitlines()
    namespace: dict = {}
    checked = 0
    for line, after in zip(lines, lines[1:] + [""]):
        if not line.strip() or line.startswith("#"):
            continue
        code = line.split("  #")[0]
        if after.startswith("# -> "):
            got = repr(eval(code, namespace))  # noqa: S307 - the README's own example
            shown = after.removeprefix("# -> ").strip()
            pattern = ".*".join(re.escape(part) for part in shown.split("..."))
            assert re.fullmatch(pattern, got), f"README: {code}\nshows {shown}\nreturns {got}"
            checked += 1
        else:
            exec(code, namespace)  # noqa: S102
    assert checked >= 2
