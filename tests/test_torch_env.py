"""The torch settings the ``sand`` command applies, and that they are in place before torch is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sand.pipeline.base.torch_env import TORCH_ENV_DEFAULTS, apply_torch_env_defaults


def test_defaults_fill_gaps_and_users_settings_win():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    apply_torch_env_defaults(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "THP_MEM_ALLOC_ENABLE": "1"}


def test_the_sand_command_sets_them_before_torch_is_imported():
    code = (
        "import json, os, sys\n"
        "import sand.flows.cli as cli\n"
        "sys.argv = ['sand', '--help']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        f"names = {sorted(TORCH_ENV_DEFAULTS)!r}\n"
        "print(json.dumps({'env': {n: os.environ.get(n) for n in names}, 'torch': 'torch' in sys.modules}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in TORCH_ENV_DEFAULTS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"env": dict(TORCH_ENV_DEFAULTS), "torch": False}
