"""Users' own tasks: the dataset env, the shipped data set, multi-turn episodes (environment
tokens in context, out of the loss), the calculator tool env, env errors and pass@k eval."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import PairSumTurns

from rlkit.api import types
from rlkit.rl.envs.base import EnvError
from rlkit.rl.envs.calculator import CalculatorEnv, calculate
from rlkit.rl.envs.dataset import DATA_DIR, DatasetEnv
from rlkit.rl.envs.pair_sum import PairSumEnv
from rlkit.rl.envs.records import DataError
from rlkit.rl.graders.numeric import Numeric
from rlkit.rl.rewards.base import RewardError, WeightedReward
from rlkit.rl.rewards.correct import correct_reward
from rlkit.rl.rollouts import (
    Limits,
    evaluate,
    group_datums,
    logprob_gaps,
    sample_groups,
    score_groups,
)
from rlkit.rl.sft import completion_datum
from rlkit.run.build import as_callable
from rlkit.run.config import compose
from rlkit.run.schema import ConfigError
from rlkit.run.validate import validate

ROWS = [
    {
        "q": f"{a} plus {b}",
        "a": str(a + b),
        "sol": f"{a}+{b}={a + b}",
        "k": "small" if a < 5 else "big",
    }
    for a in range(10)
    for b in range(2)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dataset(path, **kwargs):
    args = {"prompt_field": "q", "answer_field": "a", "solution_field": "sol", "tag_field": "k"}
    return DatasetEnv(str(path), **{**args, **kwargs})


# ---- the dataset env ---------------------------------------------------------------------------
def test_dataset_env_maps_fields_and_splits_off_a_held_out_set(tmp_path):
    env = dataset(
        write_jsonl(tmp_path / "d.jsonl", ROWS),
        system_prompt="Add.",
        prompt_template="Q: {prompt} ({k})",
        eval_fraction=0.25,
    )
    assert len(env.train) == 15 and len(env.eval_problems()) == 5
    questions = {p.messages[-1]["content"] for p in env.train}
    assert not questions & {p.messages[-1]["content"] for p in env.eval_problems()}
    p = next(p for p in env.train if p.messages[-1]["content"].startswith("Q: 7 plus 1"))
    assert p.messages == (
        {"role": "system", "content": "Add."},
        {"role": "user", "content": "Q: 7 plus 1 (big)"},
    )
    assert (p.answer, p.info["tag"], env.solution(p)) == ("8", "big", "7+1=8")
    assert env.grade(p, "<answer>8</answer>").correct and not env.grade(p, "8").formatted
    # The held-out split does not depend on the run seed: runs with other seeds share it.
    other = dataset(tmp_path / "d.jsonl", eval_fraction=0.25, seed=5)
    assert [p.answer for p in other.eval_problems()] == [p.answer for p in env.eval_problems()]


def test_dataset_order_is_epochs_of_seeded_permutations_and_a_function_of_the_step(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    env = dataset(path, eval_fraction=0.0, seed=3)
    texts = lambda e, step: [p.messages[-1]["content"] for p in e.sample(None, 5, step)]  # noqa: E731
    epoch0 = [q for step in range(4) for q in texts(env, step)]
    epoch1 = [q for step in range(4, 8) for q in texts(env, step)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(r["q"] for r in ROWS)  # each once per epoch
    assert epoch0 != epoch1  # a fresh permutation per epoch
    # A resumed run (a new env object) draws the same problems at the same step.
    assert texts(dataset(path, eval_fraction=0.0, seed=3), 6) == texts(env, 6)
    assert texts(dataset(path, eval_fraction=0.0, seed=4), 0) != texts(env, 0)
    # 20 problems, 6 per step: step 3 straddles the epoch boundary (positions 18..23).
    straddle = [p.messages[-1]["content"] for p in env.sample(None, 6, 3)]
    assert straddle[:2] == epoch0[18:20] and straddle[2:] == epoch1[:4]


def test_dataset_env_reads_parquet_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    from_parquet = dataset(tmp_path / "d.parquet", seed=1)
    from_jsonl = dataset(write_jsonl(tmp_path / "d.jsonl", ROWS), seed=1)
    assert from_parquet.sample(None, 20, 0) == from_jsonl.sample(None, 20, 0)
    assert from_parquet.eval_problems() == from_jsonl.eval_problems()


def test_answer_pattern_takes_the_answer_out_of_a_worked_answer(tmp_path):
    rows = [{"q": "x", "a": "2 boxes of 617 is 1234.\n#### 1,234"}]
    env = DatasetEnv(
        str(write_jsonl(tmp_path / "g.jsonl", rows * 3)),
        "q",
        "a",
        answer_pattern=r"####\s*(.+)$",
        eval_fraction=0.0,
        grader=Numeric(),
    )
    (p,) = env.sample(None, 1, 0)
    assert p.answer == "1,234" and env.grade(p, "so <answer>1234</answer>").correct


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        (
            '{"q": "a", "a": "1"}\n{"q": "b"}\n',
            {},
            r"d.jsonl line 2: no field 'a' \(env.answer_field=a\)",
        ),
        ('{"q": "a", "a": "1"}\n\n{"q": "b", a: 2}\n', {}, r"d.jsonl.* line 3"),
        ("", {}, "the data set is empty"),
        (
            '{"q": "a", "a": "1"}\n',
            {"prompt_template": "{nope}"},
            r"line 1: env.prompt_template '\{nope\}' cannot be filled",
        ),
        ('{"q": "a", "a": "one"}\n', {"grader": Numeric()}, r"d.jsonl line 1: .*one"),
        ('{"q": "a", "a": "1"}\n', {"answer_pattern": "#### (.*)"}, r"line 1: env.answer_pattern"),
    ],
)
def test_bad_data_names_the_line_and_the_field(tmp_path, content, kwargs, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        DatasetEnv(str(tmp_path / "d.jsonl"), "q", "a", eval_fraction=0.0, **kwargs)


def test_an_empty_held_out_set_and_a_leaking_one_are_named(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    env = dataset(path, eval_fraction=0.0)  # fine for training alone ...
    with pytest.raises(DataError, match=r"env.eval_fraction=0.0 holds out no problems of env"):
        env.eval_problems()  # ... but the trainer evaluates first: NaN accuracy before
    dataset(path, eval_path=str(path))
    err = capsys.readouterr().err
    assert "warning: 20 of the 20 eval problems are also training problems (first: " in err


def test_a_prompt_longer_than_the_context_names_its_record(tmp_path, trainer):
    rows = [*ROWS, {"q": "x" * 3000, "a": "1", "sol": "1", "k": "big"}]
    env = dataset(write_jsonl(tmp_path / "long.jsonl", rows), eval_fraction=0.0)
    long = [p for p in env.train if len(p.messages[-1]["content"]) == 3000]
    sampler = trainer.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=4, temperature=1.0)
    context = trainer.get_info().max_context_length
    message = r"env DatasetEnv: .*long.jsonl line 21: the prompt is \d+ tokens, and the model's "
    with pytest.raises(EnvError, match=message + f"context is {context}"):
        sample_groups(
            sampler, trainer.get_tokenizer(), env, long, 2, params, [1], limits=Limits(context)
        )


def test_unreadable_and_missing_data_sets_are_named(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match="env.path=.*dir.jsonl: cannot read"):
        DatasetEnv(str(tmp_path / "dir.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        DatasetEnv(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="no such built-in data set; built-in: word_problems/test"):
        DatasetEnv("builtin:nope.jsonl")
    env = dataset(write_jsonl(tmp_path / "d.jsonl", ROWS), solution_field=None)
    with pytest.raises(DataError, match="set env.solution_field"):
        env.solution(env.train[0])


def test_dataset_config_builds_the_runs_grader():
    cfg = compose(["recipe=word_problems"])
    validate(cfg)
    env = as_callable(cfg.env, "env")
    assert isinstance(env.grader, Numeric) and len(env.eval_problems()) == 100
    assert {p.info["tag"] for p in env.eval_problems()} == {"add", "sub", "mul"}
    for p in env.sample(random.Random(0), 16, 0):  # worked solutions are right by the grader
        assert env.grade(p, env.solution(p)).correct
    with pytest.raises(ConfigError, match="eval_samples=4 with eval_temperature=0"):
        validate(compose(["recipe=word_problems", "eval_samples=4"]))


def test_the_shipped_data_set_is_what_the_script_writes():
    path = Path(__file__).resolve().parents[1] / "scripts" / "make_word_problems.py"
    spec = importlib.util.spec_from_file_location("make_word_problems", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for split, rows in script.generate(0, 3000, 200).items():
        shipped = (DATA_DIR / "word_problems" / f"{split}.jsonl").read_text()
        assert shipped == "".join(json.dumps(r) + "\n" for r in rows)


# ---- the calculator tool ---------------------------------------------------------------------------
def test_calculator_evaluates_arithmetic_and_nothing_else():
    assert calculate("12*37") == "444" and calculate(" 1/4 ") == "0.25"
    assert calculate("-(2+3)*4") == "-20" and calculate("6/3") == "2"
    for bad in ("__import__('os')", "2**99", "1/0", "x", "9" * 20 + "*" + "9" * 20, "1e400*1"):
        assert calculate(bad) == "error", bad


def test_calculator_env_answers_calls_and_counts_them():
    env = CalculatorEnv(eval_size=4)
    p = env.make([3, 7, 4])
    assert (p.messages[-1]["content"], p.answer) == ("3*7*4", "84")
    assert env.step(p, "<calc>3*7*4</calc>") == "<result>84</result>"
    transcript = "<calc>3*7*4</calc><result>84</result><answer>84</answer>"
    assert env.step(p, transcript) is None  # an answer ends the episode
    assert (
        env.step(p, "<calc>2*3</calc><result>6</result><calc>6*4</calc>") == "<result>24</result>"
    )
    assert env.grade(p, transcript).correct
    assert env.metrics(p, transcript) == {"tool_calls": 1, "tool_use": 1.0}
    solutions = [env.solution(q) for q in env.sample(random.Random(0), 200)]
    assert 70 < sum(isinstance(s, list) for s in solutions) < 130  # tool_fraction=0.5
    # A tool solution is the episode's turns: [call, the env's result, answer].
    assert env.solution(p) in (
        ["<calc>3*7*4</calc>", "<result>84</result>", "<answer>84</answer>"],
        "<answer>84</answer>",
    )
    for q in env.sample(random.Random(1), 20):
        solution = env.solution(q)
        assert env.grade(q, solution if isinstance(solution, str) else "".join(solution)).correct


def test_a_multi_turn_worked_solution_trains_on_the_models_turns_only(trainer):
    tokenizer = trainer.get_tokenizer()
    prompt = [1, 2, 3]
    datum = completion_datum(tokenizer, prompt, ["<calc>2*3</calc>", "<result>6</result>", "ok"])
    targets = datum.loss_fn_inputs["target_tokens"].tolist()
    weights = datum.loss_fn_inputs["weights"].tolist()
    n_call = len(tokenizer.encode("<calc>2*3</calc>", add_special_tokens=False))
    n_result = len(tokenizer.encode("<result>6</result>", add_special_tokens=False))
    start = len(prompt) - 1
    assert weights == [0.0] * start + [1.0] * n_call + [0.0] * n_result + [1.0] * 3
    assert targets[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(targets[start:-1]) == "<calc>2*3</calc><result>6</result>ok"


# ---- multi-turn episodes -------------------------------------------------------------------------
class Echo(PairSumTurns):
    """Answers every model turn with a numbered observation, for `max_turns` turns."""

    max_turns = 3

    def __init__(self, fail_on_turn: int = 0):
        super().__init__()
        self.fail_on_turn = fail_on_turn

    def step(self, problem, transcript):
        turn = transcript.count("<obs") + 1
        if turn == self.fail_on_turn:
            raise KeyError("no such tool")
        return f"<obs {turn}>"

    def metrics(self, problem, transcript):
        return {"observations": transcript.count("<obs")}


def test_a_multi_turn_datum_masks_every_environment_token(trainer):
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=6, temperature=1.0)
    env = Echo()
    problems = env.sample(random.Random(0), 2)
    groups = sample_groups(sampler, tokenizer, env, problems, 2, params, [11, 12])
    datums = [d for g in groups for d in group_datums(g, torch.tensor([1.0, -2.0]))]
    observations = [tokenizer.encode(f"<obs {t}>", add_special_tokens=False) for t in (1, 2)]
    for group in groups:
        for episode, datum in zip(
            group.episodes, group_datums(group, torch.tensor([1.0, -2.0])), strict=True
        ):
            assert episode.turns == 3 and episode.text.count("<obs") == 2
            targets = datum.loss_fn_inputs["target_tokens"].tolist()
            advantages = datum.loss_fn_inputs["advantages"].tolist()
            logprobs = datum.loss_fn_inputs["logprobs"].tolist()
            start = len(group.prompt) - 1  # target index of the first token after the prompt
            assert targets[start:] == episode.tokens
            # Token by token: the model's tokens carry the advantage and the sampler's logprob,
            # the prompt's and the environment's carry neither.
            assert all(a == 0 for a in advantages[:start])
            for k, is_model in enumerate(episode.model_mask):
                assert (advantages[start + k] != 0) == is_model
                assert (logprobs[start + k] != 0) == is_model  # a sampled logprob is never 0
            env_tokens = [
                t for t, m in zip(episode.tokens, episode.model_mask, strict=True) if not m
            ]
            assert env_tokens == observations[0] + observations[1]
    # Later turns were sampled from the whole context: the trainer's logprobs of every model
    # token (all three turns) agree with the sampler's.
    out = trainer.forward_backward(datums, "importance_sampling").result()
    gaps = logprob_gaps(datums, out.loss_fn_outputs)
    assert gaps.numel() == sum(sum(e.model_mask) for g in groups for e in g.episodes)
    assert gaps.abs().max() < 1e-4


def test_single_turn_is_the_one_turn_case(trainer):
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    env = PairSumEnv(eval_size=2)
    params = types.SamplingParams(max_tokens=4, temperature=1.0)
    (group,) = sample_groups(
        sampler, tokenizer, env, env.sample(random.Random(0), 1), 3, params, [5]
    )
    assert [e.turns for e in group.episodes] == [1, 1, 1]
    assert all(all(e.model_mask) for e in group.episodes)


def test_an_env_that_raises_is_named_or_its_group_skipped(trainer, capsys):
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=3, temperature=1.0)
    env = Echo(fail_on_turn=2)
    problems = env.sample(random.Random(0), 2)
    with pytest.raises(EnvError, match=r"env Echo.step raised KeyError: 'no such tool'.*turn 2"):
        sample_groups(sampler, tokenizer, env, problems, 2, params, [1, 2])
    groups = sample_groups(sampler, tokenizer, env, problems, 2, params, [1, 2], "skip")
    assert all(e.error and e.turns == 2 for g in groups for e in g.episodes)
    rewards = [WeightedReward("correct", 1.0, correct_reward)]
    ok = sample_groups(sampler, tokenizer, Echo(), problems, 2, params, [1, 2])
    scores = score_groups([groups[0], ok[0]], rewards, "raise", step=7)
    assert scores[0] is None and scores[1] is not None
    assert "RL step 7: skipped 1 of 2 groups" in capsys.readouterr().err
    with pytest.raises(RewardError, match="every group failed"):
        score_groups(groups, rewards, "raise", step=8)


class Endless(Echo):
    """Never ends the episode: each observation is `size` characters."""

    max_turns = 10**6

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def step(self, problem, transcript):
        return "o" * self.size


def test_an_episode_that_fills_the_context_ends_there_as_truncated(trainer):
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    context = trainer.get_info().max_context_length
    params = types.SamplingParams(max_tokens=8, temperature=1.0)
    env = Endless(size=300)
    problems = env.sample(random.Random(0), 2)
    groups = sample_groups(
        sampler, tokenizer, env, problems, 2, params, [3, 4], limits=Limits(context)
    )
    for group in groups:
        for episode in group.episodes:
            used = len(group.prompt) + len(episode.tokens)
            # Ended because the next observation did not fit, not by max_turns or an error.
            assert episode.truncated and episode.error is None and used <= context
            assert used + len(tokenizer.encode("o" * 300)) >= context and episode.turns > 3
    datums = [d for g in groups for d in group_datums(g, torch.tensor([1.0, -1.0]))]
    trainer.forward_backward(datums, "importance_sampling").result()  # every datum fits


def test_an_observation_that_alone_fills_the_context_names_the_env(trainer):
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    context = trainer.get_info().max_context_length
    params = types.SamplingParams(max_tokens=4, temperature=1.0)
    env = Endless(size=1_000_000)
    problems = env.sample(random.Random(0), 1)
    message = rf"env Endless.step returned an observation of 1000000 tokens .*context of {context}"
    with pytest.raises(EnvError, match=message):
        sample_groups(sampler, tokenizer, env, problems, 2, params, [1], limits=Limits(context))
    (group,) = sample_groups(
        sampler, tokenizer, env, problems, 2, params, [1], "skip", limits=Limits(context)
    )
    assert all("1000000 tokens" in e.error for e in group.episodes)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (42, "env Bad.step returned int 42 .*it must return the observation as a str"),
        (b"obs", "env Bad.step returned bytes b'obs'"),
    ],
)
def test_an_observation_that_is_not_text_names_the_env(trainer, returned, message):
    class Bad(Echo):
        def step(self, problem, transcript):
            return returned

    sampler = trainer.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=3, temperature=1.0)
    problems = Bad().sample(random.Random(0), 1)
    with pytest.raises(EnvError, match=message):
        sample_groups(sampler, trainer.get_tokenizer(), Bad(), problems, 2, params, [1])


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda ps: ps[:1], r"Short.sample\(rng, 2, step=0\) returned 1 problems for the 2 asked"),
        (lambda ps: [], "returned no problems"),
        (lambda ps: None, "returned NoneType, not a list"),
        (
            lambda ps: ["2+2", *ps[1:]],
            "returned a str '2\\+2' among its problems; each must be a Problem",
        ),
    ],
)
def test_what_an_env_samples_is_checked(returned, message):
    from rlkit.rl.envs.base import draw

    class Short(Echo):
        def sample(self, rng, n, step=0):
            return returned(super().sample(rng, n, step))

    with pytest.raises(EnvError, match=message):
        draw(Short(), random.Random(0), 2, 0)


@pytest.mark.parametrize("turns", [0, -5, 1.5, True])
def test_an_env_with_no_turns_is_refused(turns):
    from rlkit.rl.envs.base import check_env

    class NoTurns(Echo):
        max_turns = turns

    with pytest.raises(EnvError, match=rf"env NoTurns: max_turns must be an int >= 1, got {turns}"):
        check_env(NoTurns())


def test_eval_pass_at_k_and_env_metrics(trainer):
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    env = Echo()
    params = types.SamplingParams(max_tokens=3, temperature=1.0)
    m = evaluate(sampler, env, tokenizer, params, samples=3, seeds_P=[1, 2])
    assert m["eval/pass@3"] >= m["eval/accuracy"]
    assert m["eval/observations"] == 2.0  # every episode ran three turns
    assert {k for k in m if k.startswith("eval/pass@3/")} == {
        f"eval/pass@3/{p.info['tag']}" for p in env.eval_problems()
    }
    again = evaluate(sampler, env, tokenizer, params, samples=3, seeds_P=[1, 2])
    assert again == m  # seeded: the same episodes
    m_skip = evaluate(
        sampler,
        Echo(fail_on_turn=2),
        tokenizer,
        params,
        samples=3,
        seeds_P=[1, 2],
        on_env_error="skip",
    )
    assert m_skip["eval/env_errors"] == 6 and m_skip["eval/accuracy"] == 0.0


# ---- time limits on users' code -------------------------------------------------------------------
def test_a_reward_that_hangs_fails_its_group_within_the_limit(capsys):
    import re
    import time

    from rlkit.rl.rollouts import Episode, Group

    def backtracks(completions, problem):  # a user's regex: exponential on "aaa...b"
        text = "a" * 40 + ("b" if problem.answer == "2" else "")
        return [float(bool(re.match(r"(a+)+$", text))) for _ in completions]

    env = PairSumEnv(eval_size=2)
    episodes = [Episode(text="<answer>2</answer>"), Episode(text="x")]
    groups = [Group(env.make([1, 1]), [1], episodes), Group(env.make([2, 2]), [1], episodes)]
    rewards = [WeightedReward("slow", 1.0, backtracks)]
    started = time.monotonic()
    with pytest.raises(RewardError, match=r"^reward 'slow' did not return within plugin_timeout_s"):
        score_groups(groups, rewards, "raise", timeout_s=0.5)
    assert time.monotonic() - started < 30  # it would run for hours
    scores = score_groups(groups, rewards, "skip", step=3, timeout_s=0.5)
    assert scores[0] is None and scores[1].total == [1.0, 1.0]  # the timer was disarmed
    assert "RL step 3: skipped 1 of 2 groups" in capsys.readouterr().err


def test_an_env_step_that_hangs_is_the_envs_error(trainer):
    import time

    class Hangs(Echo):
        def step(self, problem, transcript):
            while True:  # a tool that never answers
                time.sleep(0.05)

    sampler = trainer.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=3, temperature=1.0)
    problems = Hangs().sample(random.Random(0), 1)
    limits = Limits(timeout_s=0.3)
    args = (sampler, trainer.get_tokenizer(), Hangs(), problems, 2, params, [1])
    message = r"env Hangs.step did not return within plugin_timeout_s=0.3 s \(problem"
    with pytest.raises(EnvError, match=message):
        sample_groups(*args, limits=limits)
    (group,) = sample_groups(*args, "skip", limits=limits)
    assert all("did not return within" in e.error for e in group.episodes)


# ---- arithmetic (recipe=smollm2's task) ---------------------------------------------------------
def test_arithmetic_problems_answers_tags_and_grades():
    from rlkit.rl.envs.arithmetic import ArithmeticEnv

    env = ArithmeticEnv(ops=["+", "-", "*"], digits=[2, 1], template="What is {expression}?")
    problems = env.sample(random.Random(0), 300)
    assert {p.info["tag"] for p in problems} == {"add", "sub", "mul"}
    for p in problems:
        a, op, b = p.info["expression"].split()
        assert 10 <= int(a) <= 99 and 1 <= int(b) <= 9
        assert int(p.answer) == eval(f"{a}{op}{b}") >= 0  # noqa: S307 - the test's own oracle
        assert p.messages == ({"role": "user", "content": f"What is {p.info['expression']}?"},)
        # The default grader reads the last number written, as the model answers in prose.
        assert env.grade(p, f"{p.info['expression']} = {p.answer}").correct
        assert env.grade(p, env.solution(p)).correct
    assert not env.grade(problems[0], "I need to add the numbers").formatted
    assert env.sample(random.Random(5), 4) == env.sample(random.Random(5), 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ops": ["/"]}, r"env.ops must be a non-empty list of \['\*', '\+', '-'\]"),
        ({"digits": [2]}, "env.digits must be two digit counts"),
        ({"template": "What is it?"}, "env.template must contain {expression}"),
    ],
)
def test_arithmetic_refuses_bad_arguments(kwargs, message):
    from rlkit.rl.envs.arithmetic import ArithmeticEnv

    with pytest.raises(ValueError, match=message):
        ArithmeticEnv(**kwargs)
