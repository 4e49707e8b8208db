"""Run plumbing: the config schema and its validation, checkpoints and resume, derived seeds and
determinism switches, the manifest, outputs (metrics, plots, W&B), sweeps, plugins, compare.

Talks to models only through the client API (`rlkit.client`), never to `rlkit.backend`.
"""
