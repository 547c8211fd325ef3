"""tools/check_pretrain_args.py checks a pretrain_gpt.py command line without torch. The launch
scripts' use of it (DRY_RUN=1, before a real launch) is tested in tests/test_launch_scripts.py."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.test_launch_scripts import REPO, SCRIPTS, dry_run, paths, split_command  # noqa: F401


def test_check_tool_needs_no_torch(paths):
    """tools/check_pretrain_args.py with `import torch` made to fail: still checks."""
    r = dry_run(SCRIPTS[0], paths)
    gpt_argv = split_command(r.stdout)[1]
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['deepspeed'] = None; "
            f"sys.argv = ['check_pretrain_args.py', '--world-size', '4', '--', *{gpt_argv!r}]; "
            f"runpy.run_path({str(REPO / 'tools' / 'check_pretrain_args.py')!r}, "
            "run_name='__main__')")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=60, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "checked for 4 processes" in ok.stdout
    bad = subprocess.run([sys.executable, "-c", code.replace("'4'", "'3'")],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "check_pretrain_args.py: error: --global-batch-size 256 is not a positive multiple of "
        "--micro-batch-size 16 x data-parallel size 3 (= 48)"]
