"""Shared helpers for the command-line tests: run the installed console script as a user would."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def cli_command():
    "The `progressive-ct` console script of this environment (beside the interpreter), else `python -m`."
    exe = Path(sys.executable).with_name('progressive-ct')
    if exe.exists(): return [str(exe)]
    found = shutil.which('progressive-ct')
    return [found] if found else [sys.executable, '-m', 'progressive_ct.cli']


@pytest.fixture
def cli(tmp_path):
    "Run `progressive-ct ARGS...` in `tmp_path`; returns the CompletedProcess (text output)."
    def run(*args, timeout=600, cwd=None):
        env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
        return subprocess.run(cli_command() + [str(a) for a in args], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd or tmp_path, env=env)
    return run
