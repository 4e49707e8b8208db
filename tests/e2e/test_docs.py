"""The docs: the site builds with every link and anchor resolved, and their examples run.

Every ```python block of README.md and docs/*.md runs: a block whose first line names a file
(`# my_rewards.py ...`) is written to that file, the page's other blocks run in order as one
script beside those files. Every `python -m rlkit` line of a ```bash block that uses such a
file runs too, shortened by SHORT (a smaller model and fewer steps), and must train.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rlkit.run.outputs import read_jsonl
from tests.e2e import warm
from tests.e2e.runs import start_service

# The docs' commands and the site build run in subprocesses; the two extraction checks
# guard what the others run.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MODULE = re.compile(r"# (\w+)\.py\b")
# Appended to a documented command: the same run on the tiny model, one short step.
SHORT = [
    "model=rlkit_tiny",
    "adapter.rank=4",
    "warmup=none",
    "steps=1",
    "groups_per_step=2",
    "group_size=2",
    "max_tokens=8",
    "eval_every=1",
]


def fenced(page: Path, language: str) -> list[str]:
    """The page's ```LANGUAGE blocks (also those indented inside a list), without the fences."""
    out, block, indent = [], None, ""
    for line in page.read_text().splitlines():
        stripped = line.lstrip()
        if block is None and stripped == f"```{language}":
            block, indent = [], line[: len(line) - len(stripped)]
        elif block is not None and stripped == "```":
            out.append("\n".join(block))
            block = None
        elif block is not None:
            block.append(line.removeprefix(indent))
    return out


def split(page: Path) -> tuple[dict[str, str], list[str]]:
    """The page's python blocks: files (by name) and the rest, in order."""
    files, scripts = {}, []
    for block in fenced(page, "python"):
        m = MODULE.match(block)
        if m:
            files[f"{m.group(1)}.py"] = block
        else:
            scripts.append(block)
    return files, scripts


def run(args: list[str], cwd: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), **(extra_env or {})}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_pages_found():
    """The extraction sees the examples (a renamed fence or folder fails here, not silently)."""
    assert {p.name for p in PAGES if fenced(p, "python")} >= {
        "README.md",
        "index.md",
        "api.md",
        "plugins.md",
    }
    assert split(ROOT / "docs" / "plugins.md")[0].keys() == {"my_rewards.py", "my_envs.py"}


@pytest.mark.slow
def test_site_builds(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a missing page or snippet, or a page
    left out of the nav fails the build."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "plugins" / "index.html").exists()


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if fenced(p, "python")], ids=lambda p: p.name)
def test_python_examples_run(page, tmp_path):
    files, scripts = split(page)
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")
        proc = run([sys.executable, "-c", f"import {name[:-3]}"], tmp_path)
        assert proc.returncode == 0, f"{page.name}: {name}\n{proc.stderr[-3000:]}"
    if not scripts:
        return
    (tmp_path / "examples.py").write_text("\n\n".join(scripts) + "\n")
    service, env = None, {}
    if any("import tinker" in script for script in scripts):  # the official SDK: a service
        service, url = start_service(tmp_path)
        env = {"TINKER_BASE_URL": url, "TINKER_API_KEY": "tml-local", "TINKER_TELEMETRY": "0"}
    try:
        proc = warm.run(
            "examples", [], tmp_path, {**os.environ, "PYTHONPATH": str(tmp_path), **env}
        )
    finally:
        if service is not None:
            service.terminate()
            service.wait(30)
    assert proc.returncode == 0, f"{page.name}\n{proc.stderr[-3000:]}"


def commands() -> list[tuple[Path, str]]:
    """Documented `python -m rlkit` lines that use a file the same page defines."""
    out = []
    for page in PAGES:
        files = split(page)[0]
        for block in fenced(page, "bash"):
            for line in block.splitlines():
                used = [f for f in files if f"{f[:-3]}." in line]
                if line.startswith("python -m rlkit ") and used:
                    out.append((page, line))
    return out


def test_commands_found():
    found = {(p.name, line.split()[3]) for p, line in commands()}
    assert ("plugins.md", "recipe=pair_sum") in found
    assert ("plugins.md", "'~env'") in found
    assert ("README.md", "recipe=pair_sum") in found


@pytest.mark.slow
@pytest.mark.parametrize(
    "page,line", commands(), ids=[f"{p.name}:{line.split()[4][:40]}" for p, line in commands()]
)
def test_plugin_commands_train(page, line, tmp_path):
    """A newcomer's path: the page's plugin file, then its command, trains and logs."""
    for name, text in split(page)[0].items():
        (tmp_path / name).write_text(text + "\n")
    args = shlex.split(line)[3:]
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = warm.run("rlkit", [*args, *SHORT, f"hydra.run.dir={run_dir}"], tmp_path, env)
    assert proc.returncode == 0, f"{page.name}: {line}\n{proc.stderr[-3000:]}"
    records = read_jsonl(run_dir / "metrics.jsonl")
    step = next(r for r in records if r["step"] == 0 and "reward/mean" in r)
    for name in re.findall(r"\+reward\.(\w+)\._target_", line):
        assert f"reward/{name}" in step
    assert "eval/accuracy" in records[-1]
