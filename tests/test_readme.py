"""Every command in the README runs as written.

The blocks marked `<!-- quick -->` run for real, in order, in a scratch folder. Every other
`nclayers` command is checked without its cost: it parses, its config file or sweep file
validates with its overrides, its override keys exist; the quick verbs among them
(`blocks`, `make-folder`) run. A file the README names (configs, benchmarks, docs) exists.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nclayers.cli import build_parser, main
from nclayers.config import Config, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def code_blocks(text: str) -> list[tuple[bool, list[str]]]:
    """(quick, commands) of every ```bash block; continuation lines joined, comments cut."""
    out, quick, lines, inside = [], False, [], False
    for line in text.splitlines():
        if line.startswith("<!-- quick"):
            quick = True
        elif line.startswith("```bash"):
            inside, lines = True, []
        elif line.startswith("```") and inside:
            out.append((quick, _commands(lines)))
            inside, quick = False, False
        elif inside:
            lines.append(line)
    return out


def _commands(lines: list[str]) -> list[str]:
    text = "\n".join(lines).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
        commands += [c.strip() for c in line.split("&&") if c.strip()]
    return commands


def nclayers_args(command: str) -> list[str] | None:
    words = shlex.split(command)
    if words[:1] == ["nclayers"]:
        return words[1:]
    if words[:1] == ["torchrun"] and "nclayers.cli" in words:
        return words[words.index("nclayers.cli") + 1 :]
    return None


BLOCKS = code_blocks(README.read_text())
COMMANDS = [c for quick, cmds in BLOCKS if not quick for c in cmds]


def test_the_readme_opens_with_install_and_test_commands():
    _, first = BLOCKS[0]
    assert first[0].startswith("pip install -e .") and first[1] == "nclayers demo"
    assert "python -m pytest -q" in first[-1]
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def test_the_quick_blocks_run_as_written(tmp_path, monkeypatch, one_thread):
    quick = [c for q, cmds in BLOCKS if q for c in cmds]
    assert quick, "the README marks no block <!-- quick -->"
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    for command in quick:
        args = nclayers_args(command)
        assert args is not None, command
        assert main(args) == 0, command
    # The tour ends with a report in which nothing is out of date.
    reports = list(tmp_path.rglob("report.html"))
    assert reports and all("out of date" not in r.read_text() for r in reports)


def _known_key(key: str) -> bool:
    model: type = Config
    parts = key.split(".")
    for part in parts:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return False
        if part == "options":  # model.options.* are the constructor's own keywords
            return True
        model = fields[part].annotation
    return True


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[:60])
def test_every_command_parses_and_validates(command, tmp_path):
    words = shlex.split(command)
    if words[0] in ("pip", "bash", "python"):
        files = [w for w in words if w.endswith((".py", ".sh")) and "/" in w]
        assert all((ROOT / f).is_file() for f in files), files
        return
    args = nclayers_args(command)
    assert args is not None, f"not an nclayers command: {command}"
    parsed, extra = build_parser().parse_known_args(args)
    overrides = [*getattr(parsed, "overrides", []), *extra]
    for text in overrides:
        key, _ = parse_override(text)
        assert _known_key(key) or key.startswith("slurm."), f"{key} in: {command}"
    target = getattr(parsed, "config", None) or getattr(parsed, "file", None)
    if parsed.verb == "sweep":
        from nclayers.jobs.sweep import load_sweep

        assert load_sweep(ROOT / target, overrides).runs
    elif target and target.endswith(".yaml"):
        load_config(ROOT / target, overrides)
    if parsed.verb == "blocks":
        assert main(args) == 0
    if parsed.verb == "make-folder":
        assert main(["make-folder", str(tmp_path / "f"), *args[2:]]) == 0


def test_files_named_in_the_readme_exist():
    text = README.read_text()
    pattern = r"\b((?:configs|docs|benchmarks|src/nclayers)/[\w./-]+\.(?:yaml|md|png|py|sh))"
    for name in re.findall(pattern, text):
        assert (ROOT / name).is_file(), name
