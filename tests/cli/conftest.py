from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("confide-simulate")


@pytest.fixture
def simulate(tmp_path: Path):
    """Run the installed `confide-simulate` console script in `tmp_path`."""

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        assert SCRIPT.exists(), f"console script not installed at {SCRIPT}"
        env = os.environ | {"COLUMNS": "200", "NO_COLOR": "1"}
        return subprocess.run(
            [str(SCRIPT), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    return run
