"""What a plugin imports stays light: `import rlkit.rewards`, `rlkit.envs` or `rlkit` in a
fresh interpreter (a subprocess each) loads no torch, transformers or peft."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("module", ["rlkit.rewards", "rlkit.envs", "rlkit"])
def test_plugin_imports_do_not_load_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
