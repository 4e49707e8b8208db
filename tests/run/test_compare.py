"""`python -m rlkit.repro compare` (rlkit.run.compare) on two run dirs that differ: the first
divergence, and the manifest's differences with the likeliest cause of other bits first (a
package version, then a machine trait, then a switch, then the config). Real runs are compared
end to end in tests/e2e/test_repro.py."""

import json

from rlkit.run import compare


def run_dir(path, loss: float, torch_version: str, vendor: str, seed: int):
    path.mkdir()
    (path / "metrics.jsonl").write_text(json.dumps({"step": 0, "train/loss": loss}) + "\n")
    manifest = {
        "config": {"seed": seed},
        "versions": {"torch": torch_version},
        "environment": {"packages": {"torch": torch_version, "numpy": "2.3.0"}},
        "machine": {"cpu_vendor": vendor, "cpu_count": 2},
        "env": {"MKL_CBWR": None},
        "started_at": str(seed),  # volatile: never listed
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_the_report_names_a_package_version_first_then_machine_traits_then_the_config(
    tmp_path, capsys
):
    a = run_dir(tmp_path / "a", 0.5, "2.13.0+cpu", "AuthenticAMD", 0)
    b = run_dir(tmp_path / "b", 0.25, "2.14.1", "GenuineIntel", 1)
    assert compare.main(["compare", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "metrics.jsonl first diverges at step 0, metric train/loss: 0.5 (A) vs 0.25 (B)" in out
    assert "first suspect: environment.packages.torch: '2.13.0+cpu' (A) vs '2.14.1' (B)" in out
    listed = out.split("manifest fields that differ")[1].splitlines()[1:]
    assert [line.split(":")[0].strip() for line in listed] == [
        "environment.packages.torch",
        "versions.torch",
        "machine.cpu_vendor",
        "config.seed",
    ]


def test_equal_runs_name_no_suspect_and_a_config_difference_alone_is_none(tmp_path, capsys):
    a = run_dir(tmp_path / "a", 0.5, "2.13.0+cpu", "AuthenticAMD", 0)
    b = run_dir(tmp_path / "b", 0.5, "2.13.0+cpu", "AuthenticAMD", 0)
    assert compare.main(["compare", str(a), str(b)]) == 0
    assert "suspect" not in capsys.readouterr().out
    c = run_dir(tmp_path / "c", 0.25, "2.13.0+cpu", "AuthenticAMD", 1)
    assert compare.main(["compare", str(a), str(c)]) == 1
    out = capsys.readouterr().out
    assert "suspect" not in out and "config.seed: 0 (A) vs 1 (B)" in out
