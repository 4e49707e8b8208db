"""Rollout engines: they turn a prompt and SamplingParams into sampled sequences."""
