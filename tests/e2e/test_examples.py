"""The tutorial's examples (rlkit.examples) trained end to end."""

import pytest

from rlkit.examples import first_sft


@pytest.mark.slow  # 48 training steps and sampling, end to end
def test_first_sft_exercise_learns_foo():
    """The tutorial's first exercise: loss < 10% of start, then `foo<|im_end|>` on unseen questions."""
    result = first_sft.run(base_model="rlkit-tiny", steps=48, num_samples=8, verbose=False)
    assert result.losses[-1] < 0.1 * result.losses[0], result.losses
    outs = [s for samples in result.samples.values() for s in samples]
    hits = sum(s == "foo<|im_end|>" for s in outs)
    assert hits > len(outs) / 2, outs
    assert result.logprobs_match_tokens
