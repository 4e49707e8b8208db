"""`python -m rlkit.repro compare RUN_A RUN_B`: are two runs bitwise equal, and if not, where do
they first diverge (metrics.jsonl, adapter/ files, manifest fields)?
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlkit.run.manifest import VOLATILE, flatten


@dataclass
class Comparison:
    """How two run directories differ; `equal` means metrics.jsonl and adapter/ are bitwise equal."""

    metrics: str | None = None  # first divergence, or None when the files are identical
    adapter: list[str] = field(default_factory=list)  # files of adapter/ that differ
    manifest: list[str] = field(default_factory=list)  # "key: A vs B" per differing field

    @property
    def equal(self) -> bool:
        return self.metrics is None and not self.adapter


def first_divergence(a: Path, b: Path) -> str | None:
    """Where two metrics.jsonl files first differ: the step and the metric, or None."""
    lines_a, lines_b = a.read_bytes().splitlines(), b.read_bytes().splitlines()
    for line_a, line_b in zip(lines_a, lines_b, strict=False):
        if line_a == line_b:
            continue
        rec_a, rec_b = json.loads(line_a), json.loads(line_b)
        if rec_a.get("step") != rec_b.get("step"):
            return f"step {rec_a.get('step')} (A) vs step {rec_b.get('step')} (B) on the same line"
        for key in sorted(set(rec_a) | set(rec_b)):
            if rec_a.get(key, "<absent>") != rec_b.get(key, "<absent>"):
                return (
                    f"step {rec_a['step']}, metric {key}: "
                    f"{rec_a.get(key, '<absent>')} (A) vs {rec_b.get(key, '<absent>')} (B)"
                )
        return f"step {rec_a['step']}: same values, different bytes"
    if len(lines_a) != len(lines_b):
        longer, extra = ("A", lines_a) if len(lines_a) > len(lines_b) else ("B", lines_b)
        step = json.loads(extra[min(len(lines_a), len(lines_b))]).get("step")
        return f"{longer} goes on from step {step} ({len(lines_a)} vs {len(lines_b)} lines)"
    return None


def differing_files(a: Path, b: Path) -> list[str]:
    """Relative paths under two directories whose bytes differ or that exist on one side only."""
    files_a = (
        {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()} if a.is_dir() else set()
    )
    files_b = (
        {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()} if b.is_dir() else set()
    )
    if not files_a and not files_b:
        return []
    out = []
    for rel in sorted(files_a | files_b):
        if rel not in files_a or rel not in files_b:
            out.append(f"{rel} (only in {'B' if rel not in files_a else 'A'})")
        elif (a / rel).read_bytes() != (b / rel).read_bytes():
            out.append(rel)
    return out


# Where two runs' bits come from, likeliest cause first: the packages (versions, the lock), then
# the machine (CPU, math libraries' code paths), then the switches and environment variables
# that pick kernels; the config and the rest after them.
SUSPECTS = (("versions", "environment"), ("machine", "device"), ("determinism", "env", "processes"))


def suspicion(key: str) -> int:
    """The rank of a manifest key (or a "key: A vs B" line) among SUSPECTS; the rest rank last."""
    top = key.split(":")[0].split(".")[0]
    return next((rank for rank, tops in enumerate(SUSPECTS) if top in tops), len(SUSPECTS))


def manifest_differences(a: Path, b: Path) -> list[str]:
    """ "key: A vs B" for each manifest field that differs, the likeliest causes of different
    bits first (SUSPECTS), then by key."""
    if not (a.exists() and b.exists()):
        return [f"manifest.json missing in {'A' if not a.exists() else 'B'}"]
    flat_a = flatten(json.loads(a.read_text()))
    flat_b = flatten(json.loads(b.read_text()))
    keys = [
        key
        for key in set(flat_a) | set(flat_b)
        if key.split(".")[0] not in VOLATILE and flat_a.get(key) != flat_b.get(key)
    ]
    return [
        f"{key}: {flat_a.get(key, '<absent>')!r} (A) vs {flat_b.get(key, '<absent>')!r} (B)"
        for key in sorted(keys, key=lambda k: (suspicion(k), k))
    ]


def compare(run_a: Path, run_b: Path) -> Comparison:
    run_a, run_b = Path(run_a), Path(run_b)
    for run in (run_a, run_b):
        if not (run / "metrics.jsonl").exists():
            raise FileNotFoundError(f"{run} is not a run directory (no metrics.jsonl)")
    return Comparison(
        metrics=first_divergence(run_a / "metrics.jsonl", run_b / "metrics.jsonl"),
        adapter=differing_files(run_a / "adapter", run_b / "adapter"),
        manifest=manifest_differences(run_a / "manifest.json", run_b / "manifest.json"),
    )


def report(result: Comparison, run_a: Path, run_b: Path) -> str:
    lines = [f"A = {run_a}", f"B = {run_b}"]
    if result.equal:
        lines.append("bitwise equal: metrics.jsonl and adapter/ are identical")
    else:
        lines.append("NOT equal:")
        if result.metrics:
            lines.append(f"  metrics.jsonl first diverges at {result.metrics}")
        if result.adapter:
            lines.append(f"  adapter/ files that differ: {', '.join(result.adapter)}")
        else:
            lines.append("  adapter/ files are identical")
        suspects = [d for d in result.manifest if suspicion(d) < len(SUSPECTS)]
        if suspects:
            lines.append(f"  first suspect: {suspects[0]}")
    if result.manifest:
        lines.append(
            "manifest fields that differ (likeliest causes first: packages, machine, switches):"
        )
        lines += [f"  {line}" for line in result.manifest]
    else:
        lines.append("manifests agree (timestamps and command lines aside)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlkit.repro",
        description="Are two runs bitwise equal? If not, where do they first diverge.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser(
        "compare", help="are two runs bitwise equal? if not, where do they first diverge"
    )
    cmp.add_argument("run_a", type=Path)
    cmp.add_argument("run_b", type=Path)
    args = parser.parse_args(argv)
    try:
        result = compare(args.run_a, args.run_b)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(result, args.run_a, args.run_b))
    return 0 if result.equal else 1
