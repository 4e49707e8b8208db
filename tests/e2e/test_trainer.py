"""The declarative trainer end to end (`python -m rlkit`, or its loop in process): run
outputs, stop strings, the calculator tool env, reward errors, the W&B logger, the algorithm
options and a QDoRA run reproduced bitwise."""

import json
import textwrap
from collections import Counter

import pytest
from hydra.utils import instantiate
from safetensors.torch import load_file

from rlkit.rl.loop import train
from rlkit.rl.rewards.base import RewardError
from rlkit.run.config import compose
from rlkit.run.outputs import read_jsonl
from rlkit.run.validate import validate
from tests.e2e import warm
from tests.e2e.runs import FAST, cli
from tests.helpers import requires_bitsandbytes

# Subprocess runs and end-to-end training: not in `make test-fast`.
pytestmark = pytest.mark.slow

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


def test_shortened_pair_sum_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    cli([*FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path)

    records = read_jsonl(run_dir / "metrics.jsonl")
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
    records = read_jsonl(run_dir / "metrics.jsonl")
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
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
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


@requires_bitsandbytes
@pytest.mark.slow
def test_cli_qdora_run_is_bitwise_reproducible(tmp_path):
    """`python -m rlkit ... model.quantize=nf4 adapter=dora` twice: the same bits."""
    args = [
        "recipe=pair_sum",
        "model=rlkit_tiny",
        "model.quantize=nf4",
        "adapter=dora",
        "adapter.rank=4",
        "warmup.steps=1",
        "warmup.batch_size=4",
        "steps=2",
        "groups_per_step=2",
        "group_size=4",
        "max_tokens=8",
        "env.eval_size=2",
        "eval_every=2",
        "reward=[format,correct,concise]",
        "reward.concise.only_correct=false",
        "determinism.num_threads=1",
    ]
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        cli([*args, f"hydra.run.dir={run}"], cwd=tmp_path)
    metrics = read_jsonl(runs[0] / "metrics.jsonl")
    rl = [m for m in metrics if "sync/probe_mismatch" in m]
    assert len(rl) == 2 and all(m["sync/probe_mismatch"] <= 1e-6 for m in rl)
    assert all(m["train/logprob_mismatch"] <= 1e-5 for m in rl)
    compared = warm.run("rlkit.repro", ["compare", *runs], tmp_path)
    assert compared.returncode == 0, compared.stdout + compared.stderr
