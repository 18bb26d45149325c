"""`confide-simulate export`: a scenario's virtual institutions as CSV files (NPZ archives
for image tasks, whose shape a CSV would lose).

To try a deployment on one machine: each file is what one institution would hold (its
training and validation examples, never the coordinator's held-out test set), ready for
`confide-client join --data FILE`.
"""

from __future__ import annotations

from pathlib import Path

from confide.common.files import write_atomic
from confide.simulations.scenario import ScenarioConfig
from confide.tasks.datasets import Dataset, to_csv, to_npz


def export_institutions(scenario: ScenarioConfig, out: Path) -> list[Path]:
    """Write `institution-<i>.csv` (`.npz` for images) for every virtual institution into
    `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, local in enumerate(scenario.data_source().split().institutions):
        whole = Dataset.concatenate(local.train, local.validation)
        if len(whole.shape) > 1:
            path = out / f"institution-{index}.npz"
            write_atomic(path, to_npz(whole))
        else:
            path = out / f"institution-{index}.csv"
            write_atomic(path, to_csv(whole))
        paths.append(path)
    return paths
