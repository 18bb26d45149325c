"""What the coordinator asks of an institution each round, and how it travels.

The instructions ride in the Flower message's ConfigRecord as flat dotted keys
(`task.name`, `train.lr`, `privacy.target_epsilon`, ...). The institution parses them with
the same pydantic models the coordinator used, so a malformed or out-of-range value is refused
at the institution with the field name, never silently coerced.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import Field, model_validator

from confide.common.config import StrictModel, flatten, unflatten
from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.tasks.config import TaskConfig

PREFIX = "confide."


class RoundInstructions(StrictModel):
    job: str = Field(default="job", max_length=64, description="the job's name, for ledgers")
    task: TaskConfig = TaskConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig(target_epsilon=8.0)
    rounds: int = Field(default=10, ge=1, le=100_000, description="planned rounds of the job")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    # The job's run identity: the id of the run that started the job, kept when the coordinator
    # resumes it in a new Flower run. Ledgers key this job's entries by it (None: a coordinator
    # from before resuming; the institution then uses its Flower run id). A coordinator that
    # names another job's run here only changes which entries count towards this job's
    # epsilon; the dataset's limit is checked over every entry of the ledger, whatever their run.
    run: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$"
    )
    # The global model's shape, from the coordinator's test set: a deployed institution
    # encodes its labels with these names, so every institution maps class k to the same
    # output even when it holds only some classes.
    # `shape` is one example's, (d,) or images' (C, H, W): an institution refuses data of any
    # other shape. `features` is its flat size; a coordinator from before images sends only
    # `features`, which then stands for the shape (features,).
    features: int | None = Field(default=None, ge=1, le=1_000_000)
    shape: list[Annotated[int, Field(ge=1, le=100_000)]] | None = Field(
        default=None, min_length=1, max_length=3
    )
    labels: list[str] | None = Field(default=None, min_length=2, max_length=100_000)

    @model_validator(mode="after")
    def _shape_matches_features(self) -> RoundInstructions:
        size = None if self.shape is None else math.prod(self.shape)
        if size is not None and self.features is not None and size != self.features:
            raise ValueError(
                f"shape {self.shape} holds {size} values, but features is {self.features}"
            )
        return self

    def input_shape(self) -> tuple[int, ...] | None:
        """The shape of one example the job's model takes (None: the job does not say)."""
        if self.shape is not None:
            return tuple(self.shape)
        return None if self.features is None else (self.features,)

    def to_config(self) -> dict[str, Any]:
        """Flat, ConfigRecord-ready dict (None values omitted, paths as strings)."""
        return flatten(self.model_dump(mode="json"), PREFIX)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RoundInstructions:
        return cls.model_validate(unflatten(dict(config), PREFIX))


# Keys of an institution's train reply (a MetricRecord) beyond Flower's "num-examples".
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
TOTAL_STEPS = "total-steps"
DP_ENABLED = "dp-enabled"
# The dataset's cumulative epsilon over every job in the institution's ledger (with its own
# accountant, DATASET_ACCOUNTANT below), at the institution's own delta; infinite once the
# dataset was trained on without DP.
DATASET_EPSILON = "dataset-epsilon"
DATASET_DELTA = "dataset-delta"
# How many rounds of this job (its `run` identity) the institution's ledger holds once this one
# is recorded: a round recorded whose update never reached the coordinator (it died) is spent
# all the same, so this can exceed the rounds the coordinator received.
ROUNDS_RECORDED = "rounds-recorded"

# The train reply's ConfigRecord that says how the round was run, and its keys (strings):
# where the institution's DP-SGD noise came from (confide.privacy.report.NOISE_GENERATORS)
# and the accountant of its dataset_epsilon.
MECHANISM = "mechanism"
NOISE_GENERATOR = "noise-generator"
DATASET_ACCOUNTANT = "dataset-accountant"
# The institution's commitment to the data it trained on (`Ledger.commitment`; absent without a
# ledger), recorded in the model's card.
DATA_COMMITMENT = "data-commitment"
