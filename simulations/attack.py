"""Malicious virtual institutions: a scenario's `[attack]` table (simulation only).

Some virtual institutions, the attackers, train honestly (DP-SGD as configured, their spend
recorded in their ledgers like anyone's) and then send something else. With w_t the global
model the round's message carried, w_i the model the attacker trained from it,
Delta = w_i - w_t its honest change and s = `scale`, an attacker sends, per floating-point
array (integer arrays, such as a step counter, are sent as trained):

    sign-flip    w_t - s * Delta          (s default 1: the honest change reversed)
    scaling      w_t + s * Delta          (s default 10: the honest change boosted)
    noise        w_i + N(0, s^2) i.i.d. per coordinate   (s default 1)
    nan          NaN in every coordinate  (the coordinator's check_update refuses it)
    label-flip   w_i trained on labels y -> (classes - 1 - y): data poisoning; the update
                 itself is what honest training on the flipped labels gives

The computation is in float64, cast back to the array's dtype. The noise of `noise` is
drawn from a generator seeded by (scenario seed, "attack", round, institution), over the
arrays in the model's order: the same scenario sends the same poison.

Attackers are listed (`institutions = [0, 3]`, virtual institution indices) or drawn:
`fraction = f` of N institutions makes round(f * N) attackers (halves rounded up, at least
one), sampled without replacement by a generator seeded by (scenario seed, "attack").
They attack from round `start_round` on and are honest before it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Self

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from pydantic import Field, field_validator, model_validator

from confide.client.data import LocalInstitution, Resolver
from confide.common.config import StrictModel
from confide.common.seeding import derive_seed
from confide.privacy.instructions import RoundInstructions
from confide.server.results import AttackKind, AttackRecord
from confide.tasks.datasets import Dataset
from confide.tasks.splits import InstitutionData

# s of each attack that has one, when the scenario gives none.
DEFAULT_SCALE: dict[AttackKind, float] = {"sign-flip": 1.0, "scaling": 10.0, "noise": 1.0}


class AttackConfig(StrictModel):
    """`[attack]`: who attacks (exactly one of `fraction` and `institutions`) and how."""

    kind: AttackKind = Field(description="sign-flip | scaling | noise | label-flip | nan")
    fraction: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="round(fraction * institutions) attackers"
    )
    institutions: list[int] | None = Field(
        default=None, min_length=1, description="the attackers' virtual institution indices"
    )
    scale: float | None = Field(
        default=None,
        gt=0.0,
        le=1e6,
        description="s: sign-flip (default 1), scaling (default 10), noise std (default 1)",
    )
    start_round: int = Field(default=1, ge=1, le=100_000, description="the first round attacked")

    @field_validator("institutions")
    @classmethod
    def _distinct_indices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(set(value)) != len(value) or min(value) < 0):
            raise ValueError("institutions must be distinct indices, 0 or more")
        return value

    @model_validator(mode="after")
    def _one_way_to_choose(self) -> Self:
        if (self.fraction is None) == (self.institutions is None):
            raise ValueError("give exactly one of attack.fraction and attack.institutions")
        if self.scale is not None and self.kind not in DEFAULT_SCALE:
            raise ValueError(f"attack.scale has no meaning for kind {self.kind!r}")
        return self

    def effective_scale(self) -> float | None:
        """s as the attack uses it (the kind's default if not given); None for kinds without."""
        return self.scale if self.scale is not None else DEFAULT_SCALE.get(self.kind)


def attacker_count(fraction: float, institutions: int) -> int:
    """round(fraction * institutions), halves up (Python's round() would round 2.5 to 2)."""
    return math.floor(fraction * institutions + 0.5)


def choose_attackers(attack: AttackConfig, *, institutions: int, seed: int) -> tuple[int, ...]:
    """The attackers' indices, sorted: the listed ones, or a seeded draw of
    `attacker_count(fraction, institutions)` (ValueError if that is none or an index is out
    of range; the scenario's validation reports both before anything runs)."""
    if attack.institutions is not None:
        chosen = sorted(attack.institutions)
        if chosen[-1] >= institutions:
            raise ValueError(
                f"attack.institutions names {chosen[-1]}; the indices are 0..{institutions - 1}"
            )
        return tuple(chosen)
    assert attack.fraction is not None  # the model's validator: exactly one of the two
    count = attacker_count(attack.fraction, institutions)
    if count < 1:
        raise ValueError(
            f"attack.fraction = {attack.fraction:g} of {institutions} institutions is no attacker"
        )
    rng = random.Random(derive_seed(seed, "attack"))
    return tuple(sorted(rng.sample(range(institutions), count)))


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


def poison_array(
    kind: AttackKind,
    *,
    current: np.ndarray,
    trained: np.ndarray,
    scale: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """What an attacker sends for one array: `current` is w_t, `trained` w_i (see the module
    docstring). Integer arrays, and label-flip's (already poisoned by its data), are `trained`
    unchanged."""
    if not _is_float(trained) or kind == "label-flip":
        return trained
    w_t, w_i = current.astype(np.float64), trained.astype(np.float64)
    if kind == "sign-flip":
        sent = w_t - scale * (w_i - w_t)
    elif kind == "scaling":
        sent = w_t + scale * (w_i - w_t)
    elif kind == "noise":
        sent = w_i + rng.normal(0.0, scale, size=w_i.shape)
    else:  # nan
        sent = np.full(w_i.shape, np.nan)
    return sent.astype(trained.dtype)


def flip_labels(data: Dataset, classes: int) -> Dataset:
    """`data` with every label y replaced by classes - 1 - y (features untouched)."""
    return replace(data, y=(classes - 1 - data.y).astype(data.y.dtype))


@dataclass(frozen=True)
class FlippedLabels:
    """A resolver: the institution `source` finds, training on flipped labels (its
    validation split, which only scores models, and its fingerprint, which names the
    dataset in its ledger, are its own). Small and picklable: Ray ships it."""

    source: Resolver

    def __call__(self, context: Context) -> LocalInstitution:
        me = self.source(context)
        load = me.load

        def poisoned(instructions: RoundInstructions) -> InstitutionData:
            local = load(instructions)
            classes = len(instructions.labels) if instructions.labels else local.train.classes
            return InstitutionData(flip_labels(local.train, classes), local.validation)

        return replace(me, load=poisoned)


@dataclass(frozen=True)
class AttackPlan:
    """The attack as the attackers' ClientApp carries it (picklable: Ray ships it)."""

    kind: AttackKind
    scale: float
    start_round: int
    attackers: frozenset[str]  # institution names
    seed: int

    @classmethod
    def of(cls, attack: AttackConfig, *, institutions: int, seed: int) -> AttackPlan:
        chosen = choose_attackers(attack, institutions=institutions, seed=seed)
        return cls(
            attack.kind,
            attack.effective_scale() or 0.0,
            attack.start_round,
            frozenset(str(index) for index in chosen),
            seed,
        )

    def attacks(self, *, server_round: int, institution: str) -> bool:
        """Whether `institution` poisons round `server_round`."""
        return institution in self.attackers and server_round >= self.start_round

    def poison(
        self, *, current: ArrayRecord, trained: ArrayRecord, server_round: int, institution: str
    ) -> ArrayRecord:
        """The arrays the attacker sends instead of `trained` (same names, order, dtypes)."""
        rng = np.random.default_rng(derive_seed(self.seed, "attack", server_round, institution))
        sent = {
            name: Array(
                poison_array(
                    self.kind,
                    current=current[name].numpy(),
                    trained=array.numpy(),
                    scale=self.scale,
                    rng=rng,
                )
            )
            for name, array in trained.items()
        }
        return ArrayRecord(array_dict=sent)


def attack_record(attack: AttackConfig, *, institutions: int, seed: int) -> AttackRecord:
    """results.json's `attack` (without the clean twin's numbers, added once it has run)."""
    chosen = choose_attackers(attack, institutions=institutions, seed=seed)
    return AttackRecord(
        kind=attack.kind,
        scale=attack.effective_scale(),
        start_round=attack.start_round,
        institutions=[str(index) for index in chosen],
        chosen="listed" if attack.institutions is not None else "drawn",
        fraction=attack.fraction,
    )
