"""The algorithm half (rlkit.rl) as a whole: it names no process (the client owns parallelism)."""


def test_the_algorithm_half_names_no_process():
    """The client owns parallelism: rlkit/rl has no rank, shard, gather or collective."""
    import re
    from pathlib import Path

    import rlkit.rl

    pattern = re.compile(r"rank|world_size|procs|processes|gather|all_reduce|shard")
    hits = [
        f"{path}:{i}: {line.strip()}"
        for path in sorted(Path(rlkit.rl.__file__).parent.rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)
