"""What an institution is asked to do in one round: local training and its privacy terms."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from confide.common.config import StrictModel


class TrainConfig(StrictModel):
    """Local training hyperparameters, identical with DP on or off."""

    local_epochs: int = Field(default=1, ge=1, le=100)
    batch_size: int = Field(
        default=32, ge=1, le=65_536, description="expected batch size (Poisson with DP)"
    )
    lr: float = Field(default=0.1, gt=0.0, le=100.0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0, description="sgd only")


class PrivacyConfig(StrictModel):
    """Sample-level differential privacy with DP-SGD.

    Give either `noise_multiplier` (sigma) or `target_epsilon`; with a target, each institution
    computes the smallest sigma that keeps its cumulative epsilon within the target after all
    planned rounds, assuming it trains in every round (conservative under client sampling).
    """

    enabled: bool = True
    target_epsilon: float | None = Field(default=None, gt=0.0, le=1000.0)
    noise_multiplier: float | None = Field(default=None, gt=0.0, le=100.0)
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1e6, description="per-sample clip C")
    accountant: Literal["rdp", "prv", "pld"] = "rdp"
    grad_sample_mode: Literal["hooks", "ew", "functorch"] = Field(
        default="hooks", description="how Opacus computes per-sample gradients"
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacyConfig:
        if not self.enabled:
            return self
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "with privacy enabled, set exactly one of privacy.target_epsilon and "
                "privacy.noise_multiplier"
            )
        return self

    def describe(self) -> str:
        """One line for people: the mechanism and its parameters."""
        if not self.enabled:
            return "no DP"
        noise = (
            f"target epsilon {self.target_epsilon:g}"
            if self.target_epsilon is not None
            else f"sigma {self.noise_multiplier:g}"
        )
        return f"DP-SGD ({noise}, delta {self.delta:g}, {self.accountant.upper()} accountant)"


class CentralPrivacyConfig(StrictModel):
    """Institution-level DP at the coordinator: each institution's model update is clipped to
    L2 norm `clipping_norm`, the job's aggregation rule combines the clipped updates (fedavg:
    their sum, divided by the number of institutions asked to train; a robust rule: its
    statistic), and Gaussian noise with standard deviation `noise_multiplier *
    clipping_norm * s` is added, s being the rule's sensitivity (1 for fedavg's sum; see
    confide.server.aggregation). One institution's whole contribution in a round
    is then protected with noise multiplier sigma (which institutions take part is public);
    rounds compose under RDP (no amplification by sampling: the job's sampling seed is not
    secret). `max_epsilon` stops the job before a
    round that would pass it.
    """

    enabled: bool = False
    noise_multiplier: float = Field(default=1.0, gt=0.0, le=1000.0, description="sigma")
    clipping_norm: float = Field(
        default=1.0, gt=0.0, le=1e6, description="L2 bound C on one institution's update"
    )
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    max_epsilon: float | None = Field(
        default=None, gt=0.0, le=1e6, description="stop before a round that would pass it"
    )

    def describe(self) -> str:
        if not self.enabled:
            return "no central DP"
        stop = f", stop at epsilon {self.max_epsilon:g}" if self.max_epsilon is not None else ""
        return (
            f"central DP (sigma {self.noise_multiplier:g}, clipping {self.clipping_norm:g}, "
            f"delta {self.delta:g}{stop})"
        )
