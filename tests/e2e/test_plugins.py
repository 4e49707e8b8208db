"""Plugins through the CLI, end to end: a reward by `_target_` override, by a YAML in the
user's own config dir, and from an installed entry point; an environment the same three ways."""

import json
import textwrap

import pytest

from rlkit.run.outputs import read_jsonl
from tests.e2e.runs import FAST, cli

# Subprocess runs of `python -m rlkit`.
pytestmark = pytest.mark.slow

PLUGIN = textwrap.dedent(
    """
    def has_digit_seven(completions, problem, bonus=1.0):
        return [bonus * ("7" in c) for c in completions]
    """
)


def _plugin_package(root):
    (root / "myrewards").mkdir(parents=True)
    (root / "myrewards" / "__init__.py").write_text(PLUGIN)
    return root


def test_plugin_reward_by_target_override(tmp_path):
    pkg = _plugin_package(tmp_path / "src")
    run_dir = tmp_path / "run"
    cli(
        [
            *FAST,
            "+reward.seven._target_=myrewards.has_digit_seven",
            "+reward.seven.weight=0.5",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        extra_env={"PYTHONPATH": str(pkg)},
    )
    first = read_jsonl(run_dir / "metrics.jsonl")[1]
    assert "reward/seven" in first


def test_plugin_reward_by_yaml_in_own_config_dir(tmp_path):
    pkg = _plugin_package(tmp_path / "src")
    (tmp_path / "myconf" / "reward").mkdir(parents=True)
    (tmp_path / "myconf" / "reward" / "seven.yaml").write_text(
        "seven:\n  _target_: myrewards.has_digit_seven\n  weight: 0.5\n  bonus: 2.0\n"
    )
    run_dir = tmp_path / "run"
    overrides = [o for o in FAST if not o.startswith("reward")]
    cli(
        [
            *overrides,
            "reward=[correct,seven]",
            f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        extra_env={"PYTHONPATH": str(pkg)},
    )
    config = (run_dir / "config.yaml").read_text()
    assert "bonus: 2.0" in config
    assert "reward/seven" in (run_dir / "metrics.jsonl").read_text()


def test_plugin_reward_from_installed_entry_point(tmp_path):
    site = _plugin_package(tmp_path / "site")
    dist = site / "myrewards-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myrewards\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rlkit.rewards]\nseven = myrewards:has_digit_seven\n")
    run_dir = tmp_path / "run"
    overrides = [o for o in FAST if not o.startswith("reward")]
    cli(
        [*overrides, "reward=[correct,seven]", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        extra_env={"PYTHONPATH": str(site)},
    )
    assert "reward/seven" in (run_dir / "metrics.jsonl").read_text()


ENV_PLUGIN = textwrap.dedent(
    """
    from rlkit.envs import Env, Grade, Problem


    class Reverse(Env):
        def __init__(self, words=("cat", "lamp", "river"), eval_size: int = 3):
            self.words, self.eval_size = list(words), eval_size

        def make(self, word):
            return Problem(({"role": "user", "content": word},), word[::-1])

        def sample(self, rng, n, step):
            return [self.make(rng.choice(self.words)) for _ in range(n)]

        def eval_problems(self):
            return [self.make(w) for w in self.words[: self.eval_size]]

        def grade(self, problem, completion):
            answer = completion.partition("<answer>")[2].partition("</answer>")[0]
            return Grade(correct=answer == problem.answer, formatted="</answer>" in completion)
    """
)
# The shortened run without the pair_sum recipe (whose env keys another env does not take).
NO_RECIPE = [o for o in FAST if not o.startswith(("recipe", "env."))]


def _eval_sizes(run_dir):
    records = read_jsonl(run_dir / "metrics.jsonl")
    return [r for r in records if "eval/accuracy" in r]


@pytest.mark.parametrize("how", ["override", "yaml", "entry_point"])
def test_plugin_env_three_ways(tmp_path, how):
    site = tmp_path / "site"
    (site / "myenvs").mkdir(parents=True)
    (site / "myenvs" / "__init__.py").write_text(ENV_PLUGIN)
    args = {
        "override": ["~env", "+env._target_=myenvs.Reverse", "+env.eval_size=2"],
        "yaml": ["env=reverse", f"hydra.searchpath=[file://{tmp_path / 'myconf'}]"],
        "entry_point": ["env=reverse", "env.eval_size=2"],
    }[how]
    (tmp_path / "myconf" / "env").mkdir(parents=True)
    (tmp_path / "myconf" / "env" / "reverse.yaml").write_text(
        "_target_: myenvs.Reverse\neval_size: 2\n"
    )
    dist = site / "myenvs-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myenvs\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rlkit.envs]\nreverse = myenvs:Reverse\n")
    run_dir = tmp_path / "run"
    overrides = [o for o in NO_RECIPE if not o.startswith("warmup")]  # Reverse has no solutions
    cli(
        [*overrides, *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        extra_env={"PYTHONPATH": str(site)},
    )
    config = (run_dir / "config.yaml").read_text()
    assert "_target_: myenvs.Reverse" in config
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples} <= {"cat", "lamp", "river"}
    assert "eval/accuracy" in _eval_sizes(run_dir)[-1]
