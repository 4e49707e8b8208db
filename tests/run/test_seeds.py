"""Seeds derived from the run seed (rlkit.run.seeds): every random stream a pure function of the
run seed and the stream's name, the same in every process, and an RNG's state kept through the
JSON of a checkpoint. Whole runs reproduced bitwise: tests/e2e/test_repro.py."""

import json
import random

from rlkit.run import seeds


def test_a_derived_seed_is_a_function_of_the_run_seed_and_the_names_only():
    assert seeds.derive_seed(0, "problems", 3) == seeds.derive_seed(0, "problems", 3)
    derived = {
        seeds.derive_seed(seed, name, step)
        for seed in (0, 1)
        for name in ("problems", "sampling")
        for step in range(50)
    }
    assert len(derived) == 200  # every stream its own seed
    assert all(0 <= s < 2**31 for s in derived)
    # sha256 of the names, not hash(): the same value in every process and on every platform.
    assert seeds.derive_seed(0, "problems", 0) == 738988203


def test_a_streams_rng_replays_and_other_streams_differ():
    draws = [seeds.rng(5, "sampling", 2).random() for _ in range(2)]
    assert draws[0] == draws[1]
    assert seeds.rng(5, "sampling", 3).random() != draws[0]
    assert seeds.rng(6, "sampling", 2).random() != draws[0]


def test_an_rng_state_saved_as_json_restores_the_stream():
    original = seeds.rng(3, "problems")
    original.random()
    saved = json.loads(json.dumps(original.getstate()))  # as a checkpoint writes it
    restored = random.Random()
    restored.setstate(seeds.rng_state(saved))
    assert [restored.random() for _ in range(5)] == [original.random() for _ in range(5)]
