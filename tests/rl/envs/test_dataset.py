"""The dataset env (rlkit.rl.envs.dataset): fields mapped, a held-out split, the order of
problems a function of the step, answer patterns, errors that name the line and the field (or the
record whose prompt is too long), the run's grader from the config, and the shipped data set."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from rlkit.api import types
from rlkit.rl.envs.base import EnvError
from rlkit.rl.envs.dataset import DATA_DIR, DatasetEnv
from rlkit.rl.envs.records import DataError
from rlkit.rl.graders.numeric import Numeric
from rlkit.rl.rollouts import Limits, sample_groups
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
    path = Path(__file__).resolve().parents[3] / "scripts" / "make_word_problems.py"
    spec = importlib.util.spec_from_file_location("make_word_problems", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for split, rows in script.generate(0, 3000, 200).items():
        shipped = (DATA_DIR / "word_problems" / f"{split}.jsonl").read_text()
        assert shipped == "".join(json.dumps(r) + "\n" for r in rows)
