"""The documents stay true to the code: the README is a short front door that starts with the
two commands a fresh machine runs; in README.md, ARCHITECTURE.md and docs/*.md every relative
link leads to a file (and heading), every ``phpn`` subcommand and flag written as code exists,
every ``phpn/...py`` and ``scripts/...`` path named is a file."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from phpn.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MANUAL = ROOT / "docs" / "MANUAL.md"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
ALL_DOCS = [README, ARCHITECTURE, *DOCS]

# The two commands that must keep working on a fresh machine; the README opens with them.
FIRST_COMMANDS = (
    "pip install -r requirements.txt && streamlit run app.py",
    "pip install -r requirements-dev.txt && python -m pytest -q",
)
MAX_README_LINES = 200

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
# "phpn CMD", "python -m phpn CMD", "torchrun ... -m phpn CMD" at the start of a command.
COMMAND = re.compile(r"(?:^|[\s;&|(\[])(?:python3? -m phpn|-m phpn|phpn)[ \t]+([a-z][\w-]*)([^\n#]*)")
PACKAGE_PATH = re.compile(r"(?<![\w/.])(phpn/[\w/]+\.py)\b")
SCRIPT_PATH = re.compile(r"(?<![\w/.])(scripts/[\w]+\.(?:py|sh))\b")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _code(text: str) -> list:
    """Everything written as code: fenced blocks (line by line, comments left out) and inline spans."""
    blocks = [line.split(" #")[0] for block in FENCE.findall(text) for line in block.splitlines()]
    prose = FENCE.sub("", text)
    return blocks + INLINE_CODE.findall(prose)


def _subparsers() -> dict:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("phpn.cli.build_parser() has no subcommands")


def _anchors(path: Path) -> set:
    """The heading anchors GitHub makes for a Markdown file."""
    slugs = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", FENCE.sub("", _text(path)), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        slugs.add(slug)
    return slugs


def test_readme_is_a_short_front_door():
    lines = _text(README).splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"


def test_readme_starts_with_the_two_commands():
    lines = [line for line in _text(README).splitlines() if line.strip()]
    assert lines[0].startswith("# ")
    assert lines[1].startswith("```")
    commands = tuple(line.split("#")[0].strip() for line in lines[2:4])
    assert commands == FIRST_COMMANDS
    assert lines[4].startswith("```")


@pytest.mark.parametrize("doc", ALL_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings(doc):
    broken = []
    for target in LINK.findall(_text(doc)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.name}: {broken}"


@pytest.mark.parametrize("doc", ALL_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_subcommands_and_their_flags_exist(doc):
    subparsers = _subparsers()
    named, wrong = set(), []
    for code in _code(_text(doc)):
        for command, rest in COMMAND.findall(code):
            named.add(command)
            if command not in subparsers:
                wrong.append(f"phpn {command}")
                continue
            if command == "app":  # every argument goes to Streamlit
                continue
            known = {flag for action in subparsers[command]._actions for flag in action.option_strings}
            wrong += [f"phpn {command} {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest)
                      if flag not in known]
    assert not wrong, f"{doc.name} names what `phpn` does not have: {wrong}"
    assert named or doc not in (README, MANUAL), f"{doc.name} names no phpn subcommand"


def test_manual_names_every_subcommand():
    named = {command for code in _code(_text(MANUAL)) for command, _ in COMMAND.findall(code)}
    assert set(_subparsers()) <= named


@pytest.mark.parametrize("doc", ALL_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_exist(doc):
    text = _text(doc)
    named = set(PACKAGE_PATH.findall(text)) | set(SCRIPT_PATH.findall(text))
    missing = sorted(path for path in named if not (ROOT / path).is_file())
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def test_the_checks_catch_what_they_should():
    # A made-up subcommand and flag are caught; prose and dotted module names are not commands.
    found = [m for code in _code("`phpn frobnicate --x`, `phpn.api`, `import phpn`\n") for m in COMMAND.findall(code)]
    assert found == [("frobnicate", " --x")]
    assert COMMAND.findall("torchrun --nproc_per_node 4 -m phpn discover --out runs/x") == [
        ("discover", " --out runs/x")]
    assert PACKAGE_PATH.findall("see phpn/api.py and docs/phpn/x.py") == ["phpn/api.py"]
    assert "the-apps-speed" in {re.sub(r"[^\w\- ]", "", "The app's speed".lower()).replace(" ", "-")}
