"""Rollout engines: they turn a prompt and SamplingParams into sampled sequences.

Each engine is one file here (a class with `name`, an `Options` dataclass and `build`, see
`base.Engine`) and one YAML in `conf/engine/` whose `_target_` is that class. `registry.ENGINES`
gives the built-in ones short names for `ServiceClient(engine=...)`; an engine written elsewhere
is used by its dotted path, with no change here.
"""
