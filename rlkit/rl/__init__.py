"""The algorithm half: the RL loop, supervised fine-tuning, advantages, environments, rewards.

Pure Python on the client API: never imports `rlkit.backend` (the contract in `make lint` checks).
"""
