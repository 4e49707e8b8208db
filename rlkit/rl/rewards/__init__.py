"""Reward functions. One per file; see `base.py` for the protocol."""
