"""The machine half: loading models and tokenizers, LoRA/DoRA adapters, batching, the learner
(forward/backward, optimizer, checkpoints), and the rollout engines with their weight sync.

Never imports `rlkit.rl`, `rlkit.run` or `rlkit.client`: callers reach it through the client.
"""
