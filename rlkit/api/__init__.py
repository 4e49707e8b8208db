"""What crosses the seam between the two halves: the API's types, the loss registry, errors.

Imports nothing of rlkit above it; modules are imported one by one (this file imports none), so
`rlkit.api.errors` stays free of torch.
"""
