"""Environments: where problems come from. See `base.py` for the protocol."""
