"""Scenario files: a job (task, data, training, privacy, federation) plus simulation settings.

A scenario is a TOML file validated by `ScenarioConfig`; CLI flags override its values. The
bundled scenarios live in `simulations/scenarios/` and can be named without a path.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from confide.client.data import SimulatedInstitutions
from confide.common.config import ConfigFileError, StrictModel, read_toml, validate_file
from confide.common.errors import ScenarioError
from confide.privacy.mechanism import default_declared_size
from confide.privacy.policy import PrivacyPolicy
from confide.server.job import FederationConfig, JobFile
from confide.server.model_file import VERSION_REFERENCE
from confide.simulations.attack import AttackConfig, choose_attackers
from confide.simulations.faults import FaultsConfig
from confide.tasks.config import resolve_task_path
from confide.tasks.splits import FederatedSplit


class SimulationSettings(StrictModel):
    institutions: int = Field(default=5, ge=1, le=100_000, description="virtual institutions")
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    cpus_per_institution: float = Field(
        default=1.0, gt=0.0, le=64.0, description="Ray CPUs reserved per running ClientApp"
    )
    gpus_per_institution: float | None = Field(
        default=None,
        ge=0.0,
        le=8.0,
        description="Ray GPUs reserved per running ClientApp (a fraction shares one GPU); by "
        "default, when the device is CUDA, the host's GPUs shared by the institutions that "
        "run at once, else none",
    )
    ray_address: str | None = Field(
        default=None, description="an existing Ray cluster; by default Ray starts locally"
    )
    policy: PrivacyPolicy | None = Field(
        default=None,
        description="every virtual institution's own limits, enforced from its ledger like a "
        "deployed institution's [privacy] table; by default spend is recorded, not limited",
    )
    declared_examples: int | list[int] | None = Field(
        default=None,
        description="the size each virtual institution publishes (one for all, or one per "
        "institution): DP-SGD's sampling rate, steps, noise and the update's weight follow "
        "from it; by default each declares its partition's training size rounded to two "
        "significant figures",
    )

    @field_validator("declared_examples")
    @classmethod
    def _positive_sizes(cls, value: int | list[int] | None) -> int | list[int] | None:
        sizes = [value] if isinstance(value, int) else (value or [])
        if any(size < 1 or size > 100_000_000 for size in sizes):
            raise ValueError("declared sizes must be between 1 and 100000000")
        return value


class ScenarioConfig(JobFile):
    name: str = Field(default="scenario", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    simulation: SimulationSettings = SimulationSettings()
    # Simulation only, never part of the job (`job()`): malicious and unreliable institutions.
    attack: AttackConfig | None = None
    faults: FaultsConfig | None = None

    @model_validator(mode="after")
    def _fits_institutions(self) -> ScenarioConfig:
        count = self.simulation.institutions
        declared = self.simulation.declared_examples
        if isinstance(declared, list) and len(declared) != count:
            raise ValueError(
                f"simulation.declared_examples lists {len(declared)} sizes for {count} institutions"
            )
        for field in ("min_available", "min_train", "min_evaluate"):
            value = getattr(self.federation, field)
            if value > count:
                raise ValueError(
                    f"federation.{field} = {value} exceeds simulation.institutions = {count}: "
                    "the simulation would wait forever"
                )
        return self

    @model_validator(mode="after")
    def _adversity_fits_institutions(self) -> ScenarioConfig:
        """Attackers and faulty institutions must be among the virtual institutions."""
        count = self.simulation.institutions
        if self.attack is not None:
            choose_attackers(self.attack, institutions=count, seed=self.seed)  # ValueError
        chosen = self.faults.institutions if self.faults is not None else None
        if chosen is not None and max(chosen) >= count:
            raise ValueError(
                f"faults.institutions names {max(chosen)}; the indices are 0..{count - 1}"
            )
        return self

    def data_source(self, state: Path | None = None) -> SimulatedInstitutions:
        """The virtual institutions: this scenario's task split among them, each with its
        ledger under `state` (none without it) and the scenario's policy."""
        return SimulatedInstitutions(
            self.task,
            self.data,
            self.simulation.institutions,
            self.seed,
            self.simulation.device,
            state=state,
            policy=self.simulation.policy,
            declared=self._declared(),
        )

    def _declared(self) -> tuple[int, ...] | None:
        declared = self.simulation.declared_examples
        if isinstance(declared, int):
            return (declared,) * self.simulation.institutions
        return tuple(declared) if declared is not None else None

    def declared_sizes(self, split: FederatedSplit) -> tuple[int, ...]:
        """The size each virtual institution of `split` publishes."""
        return self._declared() or tuple(
            default_declared_size(len(local.train)) for local in split.institutions
        )


def bundled_scenarios() -> dict[str, Path]:
    folder = resources.files("confide.simulations.scenarios")
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in folder.iterdir()
        if entry.name.endswith(".toml")
    }


def resolve_path(name_or_path: str) -> Path:
    """A file path, or the name of a bundled scenario (`digits-dp`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = bundled_scenarios()
    if name_or_path in bundled:
        return bundled[name_or_path]
    raise ScenarioError(
        f"{name_or_path}: no such file, and not a bundled scenario "
        f"(bundled: {', '.join(sorted(bundled))})"
    )


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _fit_minimums(tree: dict[str, Any]) -> dict[str, Any]:
    """Cap the federation's minimum counts at the number of institutions."""
    institutions = tree.get("simulation", {}).get("institutions")
    if not isinstance(institutions, int):
        return tree
    federation = dict(tree.get("federation", {}))
    for field in ("min_available", "min_train", "min_evaluate"):
        value = federation.get(field, FederationConfig.model_fields[field].default)
        if isinstance(value, int):
            federation[field] = min(value, institutions)
    return tree | {"federation": federation}


def _resolve_init(tree: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`tree` with a relative model file in `model.init` made absolute from `folder` (as
    `task.path` is); a registered version (`name:version`) is left as it is."""
    model = tree.get("model")
    if not isinstance(model, dict):
        return tree
    init = model.get("init")
    if not isinstance(init, str) or re.match(VERSION_REFERENCE, init):
        return tree
    return tree | {"model": model | {"init": str((folder / init).resolve())}}


def load_scenario(
    name_or_path: str,
    overrides: dict[str, Any] | None = None,
    *,
    fit_minimums: bool = False,
) -> ScenarioConfig:
    """Read, override and validate a scenario; every problem is reported at once.

    A relative `task.path` is taken relative to the scenario file and made absolute, so the
    resolved scenario a run saves can be run again from any folder.

    With `fit_minimums`, minimum institution counts above `simulation.institutions` are
    lowered to it (what `--institutions N` means on the command line).
    """
    path = resolve_path(name_or_path)
    try:
        raw = read_toml(path)
    except ConfigFileError as error:
        raise ScenarioError(str(error)) from None
    raw.setdefault("name", path.stem)
    # The file's relative data path is the file's (as a job file's is); one given as an
    # override, like any path on a command line, is the working directory's.
    raw = _resolve_init(resolve_task_path(raw, path.parent), path.parent)
    tree = _merge(raw, _resolve_init(resolve_task_path(overrides or {}, Path.cwd()), Path.cwd()))
    if fit_minimums:
        tree = _fit_minimums(tree)
    try:
        return validate_file(tree, ScenarioConfig, path=path, what="scenario")
    except ConfigFileError as error:
        raise ScenarioError(str(error)) from None
