"""The guides against the CLI and against themselves.

A fenced shell block in README.md or docs/*.md whose previous line is `<!-- runs-in-tests -->` holds
commands that run on any machine in seconds: each runs here, with this environment's `rlhf-ray`, from the
repository root, and must exit 0. Only cheap commands may be marked (`--help`, `config show`, `config docs`
without `--out`, `models list`, `data inspect` of the repository's own data), so marking a training
command fails instead of running it. Every relative link of those files must point at a file that exists,
and a link to a heading of a Markdown file at a heading it has.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- runs-in-tests -->"
RLHF_RAY = Path(sys.executable).parent / "rlhf-ray"
MIN_MARKED_BLOCKS = 5


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Command:
    where: str  # "docs/data.md:12"
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def marked_blocks(text: str, name: str) -> list[tuple[int, list[str]]]:
    """(line number of the first command line, the block's lines) of each fenced block right after the marker."""
    lines, blocks = text.splitlines(), []
    for number, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = number + 1
        assert fence < len(lines) and lines[fence].startswith("```"), f"{name}:{number + 1}: {MARKER} before no block"
        end = next((i for i in range(fence + 1, len(lines)) if lines[i].startswith("```")), None)
        assert end is not None, f"{name}:{fence + 1}: the marked block is not closed"
        blocks.append((fence + 2, lines[fence + 1 : end]))
    return blocks


def commands_of(start: int, block: list[str], name: str) -> list[Command]:
    """One command per line (a trailing backslash continues it); `#` starts a comment, as in a shell."""
    commands, pending, first = [], "", start
    for offset, line in enumerate(block):
        if not pending:
            first = start + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        argv = shlex.split(pending + line, comments=True)
        pending = ""
        if argv:
            commands.append(Command(f"{name}:{first}", tuple(argv)))
    return commands


def marked_commands() -> list[Command]:
    found = []
    for path in doc_files():
        name = str(path.relative_to(REPO))
        for start, block in marked_blocks(path.read_text(), name):
            found += commands_of(start, block, name)
    return found


def why_not_cheap(argv: tuple[str, ...]) -> str | None:
    """None for a command the test may run, else why it may not be marked."""
    if argv[0] != "rlhf-ray":
        return "only rlhf-ray commands run here"
    words = argv[1:]
    if words and words[-1] in ("--help", "-h"):
        return None
    if words[:2] == ("config", "show") or words == ("models", "list"):
        return None
    if words[:2] == ("config", "docs") and "--out" not in words:
        return None
    if words[:2] == ("data", "inspect") and len(words) > 2 and (REPO / words[2]).resolve().is_relative_to(REPO):
        return None
    return "not one of the cheap commands (--help, config show, config docs, models list, data inspect of a file here)"


COMMANDS = marked_commands()


def test_the_parser_finds_marked_blocks_and_their_commands():
    text = f"intro\n{MARKER}\n```bash\nrlhf-ray config show configs/demo.yaml \\\n  ppo.kl_coef=0.1  # why\n\n```\n"
    ((start, block),) = marked_blocks(text, "x.md")
    assert start == 4
    assert [c.argv for c in commands_of(start, block, "x.md")] == [
        ("rlhf-ray", "config", "show", "configs/demo.yaml", "ppo.kl_coef=0.1")
    ]
    assert marked_blocks("```bash\nrlhf-ray ppo configs/demo.yaml\n```\n", "x.md") == []  # not marked


def test_the_docs_mark_enough_blocks_to_run():
    blocks = sum(len(marked_blocks(path.read_text(), path.name)) for path in doc_files())
    assert blocks >= MIN_MARKED_BLOCKS, f"{blocks} blocks marked {MARKER}; the guides should keep at least 5"


def test_only_cheap_commands_are_marked():
    assert why_not_cheap(("rlhf-ray", "ppo", "configs/demo.yaml")) is not None
    assert why_not_cheap(("rlhf-ray", "config", "docs", "--out", "docs/configuration.md")) is not None
    refused = [f"{command}: {why}" for command in COMMANDS if (why := why_not_cheap(command.argv))]
    assert not refused, "\n".join(refused)


def _default_tokenizer() -> str:
    from rlhf_ray.cli import build_parser

    return build_parser().parse_args(["data", "inspect", "x"]).tokenizer


def _argv_here(command: Command, request) -> list[str]:
    """The command as this machine runs it. `data inspect` counts tokens with the default model's tokenizer;
    where that model is not in the model cache yet, the tiny test model's tokenizer stands in (fetching the
    real one would take the test past its minute)."""
    argv = [str(RLHF_RAY), *command.argv[1:]]
    if command.argv[1:3] == ("data", "inspect") and "--tokenizer" not in command.argv:
        from rlhf_ray.models.provision import is_complete, models_home

        if not is_complete(models_home() / _default_tokenizer()):
            argv += ["--tokenizer", str(request.getfixturevalue("tiny_model_dir"))]
    return argv


@pytest.mark.parametrize("command", COMMANDS, ids=[str(c) for c in COMMANDS])
def test_a_marked_command_runs(command, request):
    if why_not_cheap(command.argv):
        pytest.skip("not a cheap command (test_only_cheap_commands_are_marked fails on it)")
    done = subprocess.run(_argv_here(command, request), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


# ---- links ----

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    kept, in_fence = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
        elif not in_fence:
            kept.append((number, line))
    return kept


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for _, line in outside_fences(path.read_text()):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links() -> list[tuple[str, Path, str, str]]:
    """(where, the linking file, target path, anchor) of every relative link in the guides."""
    links = []
    for path in doc_files():
        for number, line in outside_fences(path.read_text()):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):  # not inside inline code
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                links.append((f"{path.relative_to(REPO)}:{number}", path, file_part, anchor))
    return links


def test_slugs_follow_github():
    assert slug("Storage: `run.output_dir` on a shared mount") == "storage-runoutput_dir-on-a-shared-mount"
    assert slug("Resume: `--resume`") == "resume---resume"
    assert slug("SFT/RM on a few cores") == "sftrm-on-a-few-cores"


def test_every_relative_link_points_at_a_file_that_exists():
    links = relative_links()
    assert len(links) > 20  # the guides link to each other
    broken = []
    for where, source, file_part, anchor in links:
        target = (source.parent / file_part).resolve() if file_part else source
        if not target.exists():
            broken.append(f"{where}: {file_part} does not exist")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{where}: {target.relative_to(REPO)} has no heading #{anchor}")
    assert not broken, "\n".join(broken)
