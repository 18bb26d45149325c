"""An institution's own state directory: its key pair, the coordinator's CA, its settings.

Everything here is decided by the institution: the coordinator learns only the public key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import tomli_w
from pydantic import Field

from confide.common.config import ConfigFileError, StrictModel, read_toml, validate_file
from confide.common.errors import InstitutionError
from confide.common.files import write_atomic
from confide.privacy.ledger import DEFAULT_DATASET
from confide.privacy.policy import PrivacyPolicy

# The settings file that makes a folder an institution's (deployed, not simulated): only such
# folders go into the host's ledger index (`confide.client.continuity`).
SETTINGS = "institution.toml"
# The node config key that names the institution's folder to its SuperNode's tasks (`start`
# sets it; the runner and the ClientApp read it). Here, not in `confide.client.data`, so that
# `start` and the runner's task loop read it without importing torch.
STATE_DIR_KEY = "confide-dir"
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# `confide-client start`'s /metrics (`confide.client.metrics`) unless institution.toml or an
# option says otherwise; here, with the settings that save it, not in the collector's module.
METRICS_PORT = 9465
METRICS_ADDRESS = "127.0.0.1"  # confide.common.metrics.LOOPBACK, without its imports


class InstitutionConfig(StrictModel):
    name: str = Field(description="as registered by the coordinator")
    node_id: int = Field(ge=0, description="the SuperLink's id for this institution")
    superlink: str = Field(description="HOST:PORT the SuperNode connects to")
    enrollment: str = Field(description="HOST:PORT of the coordinator's enrollment service")
    data: Path = Field(
        description="the local data (a CSV or NPZ file, or a folder of PNG images with one "
        "sub-folder per class); never leaves this host"
    )
    dataset: str = Field(
        default=DEFAULT_DATASET,
        pattern=f"^{DATASET_NAME.pattern}$",
        description="the name the ledger accounts this data under; a new name starts a new "
        "budget, so use one only for data about different people",
    )
    label_column: str = "label"
    validation_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="held out locally to score the global model"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    port: int = Field(
        default=9094,
        ge=1,
        le=65535,
        description="the SuperNode's Runtime API port on 127.0.0.1 (Flower's `--port`), where "
        "confide's runner takes this institution's tasks; one per institution on a host",
    )
    # Saved by `join` (from --metrics-port/--metrics-address) so that every later `start`
    # serves where the first did: two institutions on one host need ports of their own, which
    # an option at each start would have to repeat. Defaults keep older folders' files valid.
    metrics_port: int = Field(
        default=METRICS_PORT,
        ge=0,
        le=65535,
        description="the port of this institution's /metrics (Prometheus, plain HTTP) that "
        "`start` serves unless --metrics-port says otherwise; 0: none; one per institution "
        "on a host",
    )
    metrics_address: str = Field(
        default=METRICS_ADDRESS,
        min_length=1,
        description="the address /metrics listens on unless --metrics-address says otherwise "
        "(it authenticates no one: keep it on loopback or a network only your monitoring "
        "reaches)",
    )
    privacy: PrivacyPolicy = Field(
        default=PrivacyPolicy(), description="this institution's limits for every job"
    )
    # None only in folders joined before sizes were declared: such an institution refuses to
    # train until its operator sets one (docs/privacy.md).
    declared_examples: int | None = Field(
        default=None,
        ge=1,
        le=100_000_000,
        description="the size this institution publishes: DP-SGD's sampling rate, steps, noise "
        "and its update's weight follow from it, never from the data's actual size; `join` "
        "sets it to the training examples the data held then",
    )
    noise_generator: Literal["csprng", "torch"] = Field(
        default="csprng",
        description="csprng: every DP-SGD noise value from the OS CSPRNG; torch: PyTorch's "
        "generator (Mersenne Twister, not cryptographic) seeded from the OS CSPRNG each "
        "round, faster on large models",
    )


class InstitutionDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    private_key = property(lambda self: self.root / "institution.key")
    public_key = property(lambda self: self.root / "institution.pub")
    # A rotation's new key pair, staged until the coordinator has registered it.
    next_private_key = property(lambda self: self.root / "institution.key.next")
    next_public_key = property(lambda self: self.root / "institution.pub.next")
    ca_certificate = property(lambda self: self.root / "ca.pem")
    settings_file = property(lambda self: self.root / SETTINGS)

    def save(self, config: InstitutionConfig) -> None:
        write_atomic(
            self.settings_file, tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))
        )

    def load(self) -> InstitutionConfig:
        path = self.settings_file
        if not path.is_file():
            raise InstitutionError(
                f"{self.root}: not an institution directory (no {SETTINGS}); "
                "join first with `confide-client join`"
            )
        try:
            return validate_file(read_toml(path), InstitutionConfig, path=path, what="settings")
        except ConfigFileError as error:
            raise InstitutionError(str(error)) from error


def check_local_privacy(
    *, declared_examples: int | None, max_delta: float, training_examples: int
) -> list[str]:
    """Checks of the institution's own settings against its data, made on this host only
    (at `join` and `start`; never in a reply, where they would tell the coordinator about the
    private count). Raises InstitutionError for what would weaken the guarantee; returns
    warnings for what only costs accuracy.

    With N the declared size and n the training examples the file holds now: `max_delta`
    must be below both 1/N and 1/n, so that no job the institution accepts may publish a
    whole record; a declared size far from n scales every step by n/N.
    """
    declared = declared_examples
    if declared is None:
        raise InstitutionError(
            f"{SETTINGS}: no declared_examples. Set it to about the {training_examples} "
            "training examples the data holds (it is published: DP-SGD's sampling rate and "
            "this institution's weight follow from it); see docs/privacy.md"
        )
    limit = max_delta
    for size, what in ((declared, "declared_examples"), (training_examples, "training examples")):
        if limit >= 1.0 / size:
            raise InstitutionError(
                f"{SETTINGS}: [privacy] max_delta = {limit:g} is not below 1/{size} "
                f"({what}): a job with such a delta may publish a whole record. Choose "
                f"max_delta well below 1/{size}."
            )
    if not declared / 2 <= training_examples <= declared * 2:
        return [
            f"declared_examples = {declared}, but the data holds {training_examples} training "
            "examples: every DP-SGD step is scaled by their ratio, which costs accuracy (not "
            "privacy); update declared_examples in institution.toml if the data changed"
        ]
    return []
