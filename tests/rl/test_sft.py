"""Supervised datums (rlkit.rl.sft): the loss is on the model's own turns only (a reply, or a
multi-turn worked solution whose environment turns stay out)."""

from rlkit.rl.sft import completion_datum


def test_completion_datum_trains_on_the_reply_only():
    from rlkit.backend.models import build_tokenizer

    tok = build_tokenizer()
    prompt = [1, 2, 3]
    datum = completion_datum(tok, prompt, "ok")
    reply = tok.encode("ok", add_special_tokens=False) + [tok.eos_token_id]
    assert datum.model_input.to_ints() == prompt + reply[:-1]
    assert datum.loss_fn_inputs["weights"].tolist() == [0.0, 0.0] + [1.0] * len(reply)


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
