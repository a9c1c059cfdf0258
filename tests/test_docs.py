"""The user docs stay true to the tool: a short README, real commands and flags, links that resolve.

Fast and offline: it reads README.md and docs/*.md and introspects the Click group, nothing more.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from edgeft.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 15_000  # bytes: what, install, first success, where next; the rest lives in docs/
NOT_SHELL = {"python", "py", "json", "jsonl", "toml", "yaml", "yml", "html", "js", "javascript"}
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
GLOBAL_OPTIONS = {"-v", "--verbose", "--version", "-h", "--help"}


def code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """Each fenced code block as (its language, its lines)."""
    blocks, fence, language, lines = [], None, "", []
    for line in text.splitlines():
        opened = FENCE.match(line.strip())
        if fence is None and opened:
            fence, language, lines = opened.group(1), opened.group(2).lower(), []
        elif fence is not None and line.strip().startswith(fence):
            blocks.append((language, lines))
            fence = None
        elif fence is not None:
            lines.append(line)
    return blocks


def shell_lines(lines: list[str]) -> list[str]:
    """Lines joined across `\\` continuations."""
    joined, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return joined + ([pending] if pending else [])


def words(line: str) -> list[str]:
    """A shell line's words, without its comment."""
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote (a command's output, a JSON body cut across lines)
        return re.split(r"\s+#", line, maxsplit=1)[0].split()


def is_edgeft(word: str) -> bool:
    return word == "edgeft" or word.endswith("/edgeft")


def command_problems(line: str) -> list[str]:
    """What in one shell line names an `edgeft` command or option that does not exist."""
    tokens = words(line)
    starts = [i for i, w in enumerate(tokens) if is_edgeft(w)]
    problems = []
    for n, start in enumerate(starts):  # `edgeft tune -> edgeft merge`: each edgeft owns the words up to the next
        segment = tokens[start + 1 : starts[n + 1] if n + 1 < len(starts) else len(tokens)]
        while segment and segment[0] in GLOBAL_OPTIONS:
            segment = segment[1:]
        if not segment:
            continue
        command: click.Command = cli
        path = ["edgeft"]
        while isinstance(command, click.Group) and segment:
            name = segment[0]
            if name not in command.commands:
                problems.append(f"{' '.join(path)} has no command {name!r}")
                break
            command, segment, path = command.commands[name], segment[1:], [*path, name]
        else:
            if isinstance(command, click.Group):
                continue  # `edgeft models` alone: the group's help
            known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
            for word in segment:
                flag = word.split("=", 1)[0]
                if re.match(r"^--?[A-Za-z]", flag) and flag not in known:
                    problems.append(f"{' '.join(path)} has no option {flag}")
    return problems


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size:,} bytes (at most {README_LIMIT:,}): move detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_and_flags_exist(page: Path):
    problems = []
    for language, lines in code_blocks(page.read_text(encoding="utf-8")):
        if language in NOT_SHELL:
            continue
        for line in shell_lines(lines):
            problems += [f"{line.strip()!r}: {p}" for p in command_problems(line)]
    assert not problems, "\n".join(problems)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    for _, lines in code_blocks(text):  # a `# comment` in a code block is no heading
        text = text.replace("\n".join(lines), "")
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.MULTILINE)}


def link_problems(page: Path) -> list[str]:
    """Relative links of `page` (outside code) whose file, or heading in a Markdown file, is missing."""
    text = page.read_text(encoding="utf-8")
    for _, lines in code_blocks(text):
        text = text.replace("\n".join(lines), "")
    text = re.sub(r"`[^`\n]*`", "", text)
    problems = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{target}: no heading #{anchor} in {file.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    problems = link_problems(page)
    assert not problems, "\n".join(problems)


def test_docs_exist():
    assert len(PAGES) > 1, "docs/*.md is missing: the README links to its pages"


def test_the_checks_can_fail(tmp_path: Path):
    """The checks above would catch a made-up command, flag or link."""
    assert command_problems("edgeft tune --data d.jsonl --no-such-flag 3") == [
        "edgeft tune has no option --no-such-flag"
    ]
    assert command_problems("edgeft data nope x.jsonl") == ["edgeft data has no command 'nope'"]
    assert command_problems("edgeft tune -> edgeft export --int4 --lr 1") == ["edgeft export has no option --lr"]
    assert command_problems(".venv/bin/edgeft -v models pull smollm2-135m --force  # --not-checked") == []
    assert command_problems("accelerate launch --config_file c.yaml -m edgeft tune \\") == []
    assert shell_lines(["edgeft serve BASE \\", "    --adapter a=runs/a --bogus"]) == [
        "edgeft serve BASE      --adapter a=runs/a --bogus"
    ]
    assert command_problems(shell_lines(["edgeft serve BASE \\", "  --bogus"])[0]) == [
        "edgeft serve has no option --bogus"
    ]
    page = tmp_path / "page.md"
    page.write_text("# A title\n[ok](page.md#a-title) [bad](missing.md) [anchor](#nope) [web](https://x.org)\n")
    assert [p.split(":")[0] for p in link_problems(page)] == ["missing.md", "#nope"]
