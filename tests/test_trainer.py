"""The declarative trainer end to end: CLI, run outputs, plugins, reward errors, sweeps."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from hydra.utils import instantiate
from safetensors.torch import load_file

from rlkit.rl.loop import train
from rlkit.rl.rewards.base import RewardError
from rlkit.run.config import compose
from rlkit.run.validate import validate

# Subprocess runs, end-to-end training or vLLM: not in `make test-fast`.
pytestmark = pytest.mark.slow

# A shortened pair_sum run on the tiny model: seconds, not minutes.
FAST = [
    "recipe=pair_sum",
    "model=rlkit_tiny",
    "adapter.rank=4",
    "warmup.steps=2",
    "warmup.batch_size=4",
    "steps=3",
    "groups_per_step=2",
    "group_size=4",
    "max_tokens=12",
    "env.eval_size=4",
    "eval_every=2",
    "samples_every=1",
    "optim.schedule=linear",  # (the recipe's too) asserted below
    # Length varies even when answers are all wrong, so RL steps have a signal.
    "reward=[format,correct,concise]",
    "reward.concise.only_correct=false",
]
STEP_FIELDS = {
    "step",
    "reward/mean",
    "reward/format",
    "reward/correct",
    "reward/concise",
    "train/accuracy",
    "train/completion_tokens",
    "train/frac_skipped_groups",
    "train/failed_reward_groups",
    "train/entropy",
    "train/logprob_mismatch",
    "train/kl_sampler_trainer",
    "train/tis_capped_frac",
    "sync/probe_mismatch",
    "train/loss",
    "train/grad_norm",
    "train/lr",
    "train/truncated_frac",
}
# A shortened calculator run: a warm start long enough for the tiny model to learn the tool's form.
CALC_FAST = [
    "adapter.rank=16",
    "warmup.steps=60",
    "warmup.batch_size=16",
    "warmup.lr=1e-2",
    "steps=3",
    "groups_per_step=2",
    "group_size=4",
    "max_tokens=24",
    "env.eval_size=4",
    "eval_every=2",
    "samples_every=1",
]
TIME_FIELDS = {"step", "time/sample", "time/score", "time/train", "time/sync", "time/step"}


def cli(args, cwd, extra_env=None, check=True):
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "rlkit", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"rlkit {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_shortened_pair_sum_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    cli([*FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] >= 0 and "reward/mean" in r]
    assert len(steps) == 3
    for record in steps:
        assert set(record) >= STEP_FIELDS, STEP_FIELDS - set(record)
    # Wall-clock timings have their own file, so metrics.jsonl is the same on every run.
    timings = [json.loads(line) for line in (run_dir / "timings.jsonl").read_text().splitlines()]
    assert [t["step"] for t in timings] == [-1, 0, 1, 2]
    assert set(timings[1]) == TIME_FIELDS and "time/warmup" in timings[0]
    assert any(r["train/loss"] is not None for r in steps), "no RL update happened"
    # optim.schedule=linear: lr * (1 - step / steps), logged on steps that trained.
    for r in steps:
        if r["train/loss"] is not None:
            assert r["train/lr"] == pytest.approx(3e-4 * (1 - r["step"] / 3))
    evals = [r for r in records if "eval/accuracy" in r]
    assert len(evals) == 3  # steps 0, 2 and the final one
    # Per-kind accuracy (pair_sum tags problems n2, n4): the overall figure is their weighted mean.
    tags = Counter(p.info["tag"] for p in instantiate(compose(FAST).env).eval_problems())
    for record in evals:
        per_tag = {k.rsplit("/", 1)[1]: v for k, v in record.items() if k.count("/") == 2}
        assert set(per_tag) == set(tags)
        weighted = sum(per_tag[t] * n for t, n in tags.items()) / sum(tags.values())
        assert record["eval/accuracy"] == pytest.approx(weighted)

    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    b_matrices = [t for name, t in adapter.items() if "lora_B" in name]
    assert b_matrices and any(t.abs().sum() > 0 for t in b_matrices)  # B starts at zero

    assert (run_dir / "curves.png").stat().st_size > 1000
    assert "base_model: rlkit-tiny" in (run_dir / "config.yaml").read_text()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "answer", "completion"} <= set(samples[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    # checkpoints/ holds what docs/trainer.md lists, no client staging folders.
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest", "step_000000", "step_000003", "warm_start"], names
    assert [p.name for p in (run_dir / "manifests").iterdir()] == ["step_000000.json"]


def test_stop_strings_end_rollouts(tmp_path):
    """`stop=[...]` reaches the sampler: the same run with a stop string that occurs in a
    completion gives that completion cut right after it."""
    first = tmp_path / "a"
    cli([*FAST, "steps=1", f"hydra.run.dir={first}"], cwd=tmp_path)
    samples = [
        json.loads(x)["completion"] for x in (first / "samples.jsonl").read_text().split("\n") if x
    ]
    # An ASCII letter or digit that occurs after a completion's first character (Hydra's
    # command line reads no \u escapes: a stop string "\ufffd" arrives as six characters).
    k, stop = next(
        (k, c) for k, text in enumerate(samples) for c in text[1:] if c.isascii() and c.isalnum()
    )
    cut = samples[k][: samples[k].index(stop) + 1]
    second = tmp_path / "b"
    cli([*FAST, "steps=1", f"stop=[{json.dumps(stop)}]", f"hydra.run.dir={second}"], cwd=tmp_path)
    again = json.loads((second / "samples.jsonl").read_text().splitlines()[k])["completion"]
    assert again == cut


def test_help_lists_groups(tmp_path):
    out = cli(["--help"], cwd=tmp_path).stdout
    for group in ("reward:", "advantage:", "loss:", "model:", "env:", "grader:"):
        assert group in out, out
    recipes = next(line for line in out.splitlines() if line.startswith("recipe:"))
    assert {"pair_sum", "word_problems", "calculator"} <= set(recipes[7:].replace(",", " ").split())


def test_bad_config_fails_before_loading_a_model(tmp_path):
    proc = cli(
        ["recipe=pair_sum", "group_size=0", f"hydra.run.dir={tmp_path}/r"], tmp_path, check=False
    )
    assert proc.returncode != 0
    assert "config error: group_size must be >= 1, got 0" in proc.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


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
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
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
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
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


def test_bad_data_is_one_line_naming_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2"}\n')
    proc = cli(["env=dataset", f"env.path={tmp_path / 'd.jsonl'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "d.jsonl line 2: no field 'answer' (env.answer_field=answer)" in proc.stderr


def test_calculator_tool_env_end_to_end(tmp_path):
    """The tool env through the CLI. The warm start only shows the tool (tool_fraction=1), so
    the tiny model calls it from the first step (with wrong operands: it is tiny); the env's
    results are in the samples, the turns and tool metrics in metrics.jsonl."""
    run_dir = tmp_path / "run"
    cli(
        [
            "recipe=calculator",
            "model=rlkit_tiny",
            "env.tool_fraction=1.0",
            *CALC_FAST,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] >= 0 and "reward/mean" in r]
    assert len(steps) == 3
    assert all({"env/tool_use", "env/tool_calls", "train/turns"} <= set(r) for r in steps)
    assert max(r["env/tool_use"] for r in steps) > 0
    assert max(r["train/turns"] for r in steps) > 1
    samples = (run_dir / "samples.jsonl").read_text()
    assert "<result>" in samples


BAD_REWARDS = textwrap.dedent(
    """
    def raises(completions, problem):
        raise ZeroDivisionError("boom")

    def nan(completions, problem):
        return [float("nan")] * len(completions)

    def too_few(completions, problem):
        return [1.0]

    def returns_none(completions, problem):
        return None

    class EveryOther:
        # Fails for every other group it scores: one of the two groups of each step.

        calls = 0

        def __call__(self, completions, problem):
            EveryOther.calls += 1
            if EveryOther.calls % 2:
                raise ZeroDivisionError("boom")
            return [0.0] * len(completions)
    """
)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("raises", "reward 'bad' raised ZeroDivisionError: boom"),
        ("nan", "reward 'bad' returned non-finite or non-numeric"),
        ("too_few", "reward 'bad' returned 1 values for 4 completions"),
        ("returns_none", "reward 'bad' returned NoneType None; it must return a list of 4 numbers"),
    ],
)
def test_broken_reward_is_a_clear_error(tmp_path, monkeypatch, fn, message):
    (tmp_path / "badrewards.py").write_text(BAD_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose([*FAST, f"+reward.bad._target_=badrewards.{fn}"])
    validate(cfg)
    with pytest.raises(RewardError, match=message):
        train(cfg, tmp_path / "run")


def test_broken_reward_can_skip_its_groups(tmp_path, monkeypatch, capsys):
    (tmp_path / "badrewards.py").write_text(BAD_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose([*FAST, "+reward.bad._target_=badrewards.EveryOther", "on_reward_error=skip"])
    train(cfg, tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    failed = [r["train/failed_reward_groups"] for r in records if "train/failed_reward_groups" in r]
    assert failed == [1, 1, 1]
    err = capsys.readouterr().err
    assert err.count("skipped 1 of 2 groups whose reward or environment failed") == 3, err
    assert "reward 'bad' raised ZeroDivisionError: boom" in err


def test_a_reward_failing_in_every_group_stops_the_run_even_with_skip(tmp_path, monkeypatch):
    (tmp_path / "badrewards.py").write_text(BAD_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose([*FAST, "+reward.bad._target_=badrewards.raises", "on_reward_error=skip"])
    with pytest.raises(RewardError, match="RL step 0: every group failed"):
        train(cfg, tmp_path / "run")


def test_sweep_writes_summary_table_and_plot(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = cli(
        ["-m", *FAST, "optim.lr=1e-4,3e-4", "seed=0,1", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
    )
    table = (sweep_dir / "sweep_summary.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4
    assert all(("optim.lr=" in row and "seed=" in row) for row in rows)
    assert (sweep_dir / "sweep_curves.png").stat().st_size > 1000
    assert "sweep summary" in proc.stderr


def test_wandb_offline_without_key_and_key_never_written(tmp_path):
    run_dir = tmp_path / "run"
    secret = "test-secret-key-0123456789"
    env = {"WANDB_API_KEY": "", "WANDB_SILENT": "true"}
    proc = cli([*FAST, "logger=wandb", f"hydra.run.dir={run_dir}"], cwd=tmp_path, extra_env=env)
    assert "wandb: offline" in proc.stderr
    assert list((run_dir / "wandb").glob("offline-run-*"))

    run_dir2 = tmp_path / "run2"
    env = {"WANDB_API_KEY": secret, "WANDB_SILENT": "true"}
    cli(
        [*FAST, "logger=wandb", "logger.mode=offline", f"hydra.run.dir={run_dir2}"],
        cwd=tmp_path,
        extra_env=env,
    )
    for path in run_dir2.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_recipes_work_from_an_installed_wheel(tmp_path):
    """The configs ship inside the wheel: `python -m rlkit` works away from the source tree."""
    import zipfile
    from pathlib import Path

    # Built from a clean copy: an in-tree build/ left by an earlier build could hold stale files.
    root = tmp_path / "src"
    ignore = shutil.ignore_patterns(".*", "build", "dist", "outputs", "*.egg-info", "__pycache__")
    shutil.copytree(Path(__file__).resolve().parents[1], root, ignore=ignore)
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


def test_algorithm_options_run_end_to_end_and_reproduce_bitwise(tmp_path):
    """KL in the loss, GSPO, an entropy bonus, the overlong penalty and 2 x 2 optimizer steps
    per batch together: the run finishes, logs the KL, and a second run is bitwise the same."""
    options = [
        "kl.coef=0.1",
        "loss=gspo",
        "loss.entropy_coef=0.01",
        "overlong.mode=penalty",
        "overlong.buffer=4",
        "updates_per_batch=2",
        "minibatches=2",
    ]
    runs = []
    for name in ("a", "b"):
        cli([*FAST, *options, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path)
        runs.append((tmp_path / name / "metrics.jsonl").read_text())
    assert runs[0] == runs[1]
    steps = [json.loads(line) for line in runs[0].splitlines() if '"train/loss"' in line]
    assert all(r["train/kl_ref"] >= 0 for r in steps)
    # the reference is the policy RL starts from (the warm start's adapter), so KL starts at 0
    # up to sampler/trainer numerics
    assert steps[0]["train/kl_ref"] < 1e-4
    assert (tmp_path / "a" / "checkpoints" / "warm_start" / "adapter_model.safetensors").exists()
    assert all("reward/overlong" in r for r in steps)
    assert any(r["train/loss"] is not None for r in steps)
