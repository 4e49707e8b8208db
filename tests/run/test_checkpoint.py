"""Checkpoints (rlkit.run.checkpoint) one piece at a time, on a tiny training client (no RL
loop): what is written, what is kept, what is refused (pickled objects, garbage weights, another
adapter rank or quantization), config changes on resume, and the graceful-stop signal handling."""

import json
import os
import signal

import pytest
import torch

from rlkit.api import types
from rlkit.run import checkpoint
from rlkit.run.config import compose
from rlkit.run.schema import ConfigError
from tests.helpers import requires_bitsandbytes

BASE = ["recipe=pair_sum", "model=rlkit_tiny", "adapter.rank=8", "checkpoint.keep_last=2"]

TINY = ["recipe=pair_sum", "model=rlkit_tiny"]

# The client of the refused-checkpoint cases below (the default keep_last).
TINY_RANK8 = [*TINY, "adapter.rank=8"]


def one_step(trainer) -> None:
    tokens = list(range(1, 9))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 7},
    )
    trainer.forward_backward([datum], "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()


def saved(tmp_path, trainer, steps, *overrides):
    ckpt = checkpoint.Checkpointer(tmp_path / "run", compose([*BASE, *overrides]))
    ckpt.resume(trainer)
    for step in steps:
        one_step(trainer)
        ckpt.save(step)
    return ckpt


def test_save_writes_a_verified_checkpoint_and_keeps_the_last_n(tmp_path, trainer):
    ckpt = saved(tmp_path, trainer, [0, 2, 4])
    assert [p.name for p in ckpt.checkpoints()] == ["step_000004", "step_000002"]
    assert (ckpt.dir / "latest").read_text() == "step_000004\n"
    assert not list(ckpt.dir.glob(".tmp-*"))
    newest = ckpt.dir / "step_000004"
    assert checkpoint.verify(newest) is None
    sums = json.loads((newest / "checksums.json").read_text())
    assert {"state/adapter_model.safetensors", "state/optimizer.pt", "rng.safetensors"} <= set(sums)
    assert json.loads((newest / "trainer_state.json").read_text())["step"] == 4

    (newest / "checksums.json").unlink()  # as if killed before the write finished
    assert "incomplete" in checkpoint.verify(newest)


def test_pickled_object_in_a_checkpoint_is_refused(tmp_path, trainer, service, capsys):
    ckpt = saved(tmp_path, trainer, [0, 2])
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):  # unpickling it would create `marker`
            return (open, (str(marker), "w"))

    bad = ckpt.dir / "step_000002"
    torch.save({"state": {}, "param_groups": [], "payload": Payload()}, bad / "state/optimizer.pt")
    sums = json.loads((bad / "checksums.json").read_text())  # checksums agree: only the
    sums["state/optimizer.pt"] = checkpoint.sha256(bad / "state/optimizer.pt")  # load can tell
    (bad / "checksums.json").write_text(json.dumps(sums))

    fresh = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)
    resumed = checkpoint.Checkpointer(ckpt.run_dir, compose([*BASE, "resume=auto"])).resume(fresh)
    err = capsys.readouterr().err
    assert "refused: it holds a pickled object" in err, err
    assert resumed.step == 0 and resumed.path == ckpt.dir / "step_000000"
    assert not marker.exists()


def test_resuming_with_another_config_warns_naming_the_keys(tmp_path, trainer, service, capsys):
    ckpt = saved(tmp_path, trainer, [0])
    fresh = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)
    changed = compose([*BASE, "resume=auto", "optim.lr=0.5", "steps=99"])
    assert checkpoint.Checkpointer(ckpt.run_dir, changed).resume(fresh).step == 0
    err = " ".join(capsys.readouterr().err.split())
    base = compose(BASE)  # the recipe's values, whatever they are
    expected = f"optim.lr ({base.optim.lr} -> 0.5), steps ({base.steps} -> 99)"
    assert f"differs from the checkpoint's: {expected}" in err  # steps: the linear schedule


@pytest.mark.parametrize(
    "changes",
    [
        ["steps=99", "optim.schedule=constant"],  # no schedule depends on it: the same steps
        ["checkpoint.every=3", "checkpoint.keep_last=5", "samples_every=1"],
        ["distributed.timeout_s=10"],
    ],
)
def test_resuming_with_keys_that_keep_the_bits_does_not_warn(
    tmp_path, trainer, service, capsys, changes
):
    schedule = [c for c in changes if c.startswith("optim.")]
    ckpt = saved(tmp_path, trainer, [0], *schedule)
    fresh = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)
    changed = compose([*BASE, "resume=auto", *changes])
    assert checkpoint.Checkpointer(ckpt.run_dir, changed).resume(fresh).step == 0
    assert "differs from the checkpoint's" not in capsys.readouterr().err


def test_a_used_run_dir_needs_resume_auto(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds a run; continue it with resume=auto"):
        checkpoint.Checkpointer(tmp_path, compose(BASE))


def test_resume_command_repeats_the_overrides(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(
        "- recipe=pair_sum\n- reward=[format,correct]\n- resume=auto\n"
    )
    assert checkpoint.resume_command(tmp_path) == (
        f"python -m rlkit recipe=pair_sum 'reward=[format,correct]' "
        f"hydra.run.dir={tmp_path} resume=auto"
    )


def test_first_signal_asks_to_stop_second_aborts_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    @checkpoint.stop_on_signals
    def body():
        os.kill(os.getpid(), signal.SIGTERM)
        assert checkpoint.STOP.requested == "SIGTERM"
        # Within the repeat window, a second signal is the same request (Ctrl-C reaches a
        # launcher's processes directly and again through the launcher): no abort.
        signal.raise_signal(signal.SIGINT)
        assert checkpoint.STOP.requested == "SIGTERM"
        checkpoint.STOP.at -= checkpoint.REPEAT_WINDOW_S  # later: a second request
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            signal.raise_signal(signal.SIGINT)

    body()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert checkpoint.STOP.requested is None


def saved_checkpoints(tmp_path, trainer, steps):
    ckpt = checkpoint.Checkpointer(tmp_path / "run", compose(TINY_RANK8))
    ckpt.resume(trainer)
    for step in steps:
        ckpt.save(step)
    return ckpt


def test_resuming_with_another_adapter_rank_is_refused_before_loading(tmp_path, trainer, service):
    ckpt = saved_checkpoints(tmp_path, trainer, [0])
    fresh = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    cfg = compose([*TINY, "adapter.rank=4", "resume=auto"])
    with pytest.raises(ConfigError, match=r"different adapter.rank \(8 -> 4\)"):
        checkpoint.Checkpointer(ckpt.run_dir, cfg).resume(fresh)


def test_a_garbage_adapter_with_a_matching_checksum_falls_back(tmp_path, trainer, service, capsys):
    ckpt = saved_checkpoints(tmp_path, trainer, [0, 2])
    bad = ckpt.dir / "step_000002"
    weights = bad / "state" / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    sums = json.loads((bad / "checksums.json").read_text())
    sums["state/adapter_model.safetensors"] = checkpoint.sha256(weights)
    (bad / "checksums.json").write_text(json.dumps(sums))

    fresh = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)
    resumed = checkpoint.Checkpointer(ckpt.run_dir, compose([*TINY_RANK8, "resume=auto"])).resume(
        fresh
    )
    err = " ".join(capsys.readouterr().err.split())
    assert f"skipping checkpoint {bad}: unreadable" in err, err
    assert resumed.step == 0


def test_the_pickle_refusal_does_not_advise_weights_only_false(tmp_path, trainer, service, capsys):
    ckpt = saved_checkpoints(tmp_path, trainer, [0, 2])
    bad = ckpt.dir / "step_000002"
    torch.save({"payload": object()}, bad / "state" / "optimizer.pt")
    sums = json.loads((bad / "checksums.json").read_text())
    sums["state/optimizer.pt"] = checkpoint.sha256(bad / "state" / "optimizer.pt")
    (bad / "checksums.json").write_text(json.dumps(sums))
    fresh = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)
    checkpoint.Checkpointer(ckpt.run_dir, compose([*TINY_RANK8, "resume=auto"])).resume(fresh)
    err = capsys.readouterr().err
    assert "refused: it holds a pickled object" in err and "weights_only=False" not in err


@requires_bitsandbytes
def test_resuming_on_another_quantization_is_refused_before_loading(tmp_path, service):
    from rlkit.run import checkpoint

    tiny = ["recipe=pair_sum", "model=rlkit_tiny", "adapter.rank=8"]
    trainer = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0, quantize="nf4")
    saved = checkpoint.Checkpointer(tmp_path / "run", compose([*tiny, "model.quantize=nf4"]))
    saved.resume(trainer)
    saved.save(0)
    fresh = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)
    cfg = compose([*tiny, "resume=auto"])
    with pytest.raises(ConfigError, match=r"different model.quantize \('nf4' -> 'none'\)"):
        checkpoint.Checkpointer(saved.run_dir, cfg).resume(fresh)
