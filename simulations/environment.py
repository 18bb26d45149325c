"""Process-wide defaults for Flower and Ray: no telemetry, no update checks, quiet logs.

Set before Flower or Ray is imported, and only where the user has not chosen otherwise.
"""

from __future__ import annotations

import os

from confide.common.environment import FLOWER_DEFAULTS

QUIET_DEFAULTS = FLOWER_DEFAULTS | {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # Ray's actors inherit this; one thread per simulated institution on a shared machine.
    "OMP_NUM_THREADS": "1",
}


def apply_defaults() -> None:
    for name, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)
