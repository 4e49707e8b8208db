"""Datums checked before they reach torch (rlkit.backend.batching): bad input fails with a
sentence naming the datum and the field, never deep inside torch."""

import pytest

from rlkit.api import types
from rlkit.api.errors import InvalidDatumError, NoGradientsError
from tests.helpers import plain_datum, plain_rl_datum, policy_datum


@pytest.mark.parametrize(
    ("bad", "loss", "message"),
    [
        (
            plain_datum(weights=[1.0, 1.0]),
            "cross_entropy",
            r"datum 0: loss_fn_inputs\['weights'\] has shape \[2\], but model_input has length 4",
        ),
        (
            plain_datum(target_tokens=[11, 12, 13]),
            "cross_entropy",
            r"loss_fn_inputs\['target_tokens'\] has shape \[3\]",
        ),
        (
            plain_rl_datum(logprobs=[-1.0] * 5),
            "importance_sampling",
            r"loss_fn_inputs\['logprobs'\] has shape \[5\]",
        ),
        (
            plain_rl_datum(advantages=[0.1] * 3),
            "ppo",
            r"loss_fn_inputs\['advantages'\] has shape \[3\]",
        ),
        (
            plain_datum(target_tokens=[11, 12, 99999, 2]),
            "cross_entropy",
            r"target_tokens\[2\] = 99999 is outside the vocabulary \[0, 259\)",
        ),
        (
            plain_datum(target_tokens=[11, -1, 12, 2]),
            "cross_entropy",
            r"target_tokens\[1\] = -1 is outside",
        ),
        (
            plain_datum(weights=[1.0, float("nan"), 1.0, 1.0]),
            "cross_entropy",
            r"loss_fn_inputs\['weights'\]\[1\] = nan is not finite",
        ),
        (
            plain_rl_datum(advantages=[0.0, 0.0, float("inf"), 0.0]),
            "importance_sampling",
            r"\['advantages'\]\[2\] = inf is not finite",
        ),
        (
            plain_datum(weights=None),
            "cross_entropy",
            r"loss 'cross_entropy' needs loss_fn_inputs \['weights'\]",
        ),
        (plain_rl_datum(advantages=None), "ppo", r"needs loss_fn_inputs \['advantages'\]"),
        (plain_datum(mask=[1.0] * 4), "cross_entropy", r"does not use loss_fn_inputs \['mask'\]"),
    ],
)
def test_bad_datums_are_named(trainer, bad, loss, message):
    good = plain_datum() if loss == "cross_entropy" else plain_rl_datum()
    with pytest.raises(InvalidDatumError, match=r"datum 1: .*" + message.removeprefix("datum 0: ")):
        trainer.forward_backward([good, bad], loss).result()
    # Nothing was accumulated by the failed call.
    with pytest.raises(NoGradientsError):
        trainer.optim_step(types.AdamParams()).result()


def test_token_ids_outside_vocab_in_model_input(trainer):
    bad = types.Datum(
        types.ModelInput.from_ints([1, 500]), {"target_tokens": [2, 2], "weights": [1, 1]}
    )
    with pytest.raises(InvalidDatumError, match=r"datum 0: model_input\[1\] = 500 is outside"):
        trainer.forward([bad], "cross_entropy").result()


def test_a_datum_longer_than_the_context_is_refused_as_sample_refuses_it(trainer):
    """It trained silently: positions past the context have no trained embedding."""
    context = trainer.get_info().max_context_length

    def of_length(n):
        tokens = [10 + i % 200 for i in range(n)]
        return types.Datum(
            types.ModelInput.from_ints(tokens), {"target_tokens": tokens, "weights": [1.0] * n}
        )

    ok, long = of_length(context), of_length(context + 1)
    trainer.forward([ok], "cross_entropy").result()
    message = rf"datum 1: model_input has {context + 1} tokens, more than the model's context"
    with pytest.raises(InvalidDatumError, match=message):
        trainer.forward_backward([ok, long], "cross_entropy").result()
    with pytest.raises(InvalidDatumError, match=message):
        trainer.compute_reference_logprobs([ok, long]).result()


def test_empty_inputs(trainer):
    with pytest.raises(InvalidDatumError, match="empty list of datums"):
        trainer.forward_backward([], "cross_entropy").result()
    empty = types.Datum(types.ModelInput.empty(), {"target_tokens": [], "weights": []})
    with pytest.raises(InvalidDatumError, match="model_input is empty"):
        trainer.forward_backward([empty], "cross_entropy").result()


def test_kl_in_the_loss_without_reference_logprobs_is_named(trainer):
    with pytest.raises(InvalidDatumError, match=r"needs loss_fn_inputs \['ref_logprobs'\]"):
        trainer.forward_backward([policy_datum()], "ppo", {"kl_coef": 0.1}).result()
