"""rlkit as an installed wheel: the configs ship inside it, and `python -m rlkit` works away
from the source tree (a subprocess)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.e2e.runs import cli

pytestmark = pytest.mark.slow


def test_recipes_work_from_an_installed_wheel(tmp_path):
    """The configs ship inside the wheel: `python -m rlkit` works away from the source tree."""
    import zipfile
    from pathlib import Path

    # Built from a clean copy: an in-tree build/ left by an earlier build could hold stale files.
    root = tmp_path / "src"
    ignore = shutil.ignore_patterns(".*", "build", "dist", "outputs", "*.egg-info", "__pycache__")
    shutil.copytree(Path(__file__).resolve().parents[2], root, ignore=ignore)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(root),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("rlkit-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # The top-level conf/ and recipes/ land inside the package, and nowhere else.
    assert (site / "rlkit" / "conf" / "config.yaml").exists()
    assert (site / "rlkit" / "recipes" / "pair_sum.yaml").exists()
    assert (site / "rlkit" / "data" / "word_problems" / "train.jsonl").exists()  # builtin:
    # Beside the package, only rlkit's Hydra launcher (Hydra finds plugins in hydra_plugins).
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == [
        "hydra_plugins",
        "rlkit",
    ]
    assert (site / "hydra_plugins" / "rlkit_launcher" / "adapters.py").exists()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import rlkit; print(rlkit.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(site))
    out = cli(["recipe=pair_sum", "--cfg", "job"], cwd=tmp_path, extra_env=env).stdout
    assert "base_model: rlkit-small" in out
    help_text = cli(["--help"], cwd=tmp_path, extra_env=env).stdout
    assert re.search(r"^recipe: .*\bpair_sum\b", help_text, re.M), help_text
    # The launcher is found from the wheel too: `--cfg hydra` shows it composed.
    hydra_cfg = cli(
        ["recipe=pair_sum", "hydra/launcher=adapters", "--cfg", "hydra"],
        cwd=tmp_path,
        extra_env=env,
    ).stdout
    assert "hydra_plugins.rlkit_launcher.adapters.AdaptersLauncher" in hydra_cfg
