"""The coordinator's state directory and its settings file."""

from __future__ import annotations

from pathlib import Path

import tomli_w
from pydantic import Field, model_validator

from confide.common.config import ConfigFileError, StrictModel, read_toml, validate_file
from confide.common.errors import StateError
from confide.common.files import write_atomic

SETTINGS = "settings.toml"


class ServerSettings(StrictModel):
    """Where the coordinator listens and keeps its state (written by `confide-server init`)."""

    hosts: list[str] = Field(
        default=["localhost", "127.0.0.1"], min_length=1, description="names in the TLS cert"
    )
    # Flower 1.41's SuperLink serves its Fleet, Control and Runtime APIs over HTTPS on one
    # port and authenticates no Control caller. So it listens on 127.0.0.1:control_port, for
    # the operator's tools alone, and institutions reach it through a front on superlink_port
    # that passes on the Fleet API only (`confide.server.front`). 9094 is taken by a SuperNode
    # on the same host, so enrollment uses 9100.
    superlink_port: int = Field(
        default=9091, ge=1, le=65535, description="Fleet API front (HTTPS): institutions"
    )
    # 0 (the default, and what settings files written before it existed mean): a free port,
    # picked at each start. The port is on 127.0.0.1 only, so nothing outside needs to know it.
    control_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="the SuperLink itself, on 127.0.0.1 (operator's tools); 0: any free port",
    )
    enrollment_port: int = Field(default=9100, ge=1, le=65535, description="join tokens (gRPC)")
    bind: str = Field(default="0.0.0.0", description="the address the public services use")
    database: str = Field(default="sqlite:///{state}/confide.db", description="SQLAlchemy URL")

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServerSettings:
        ports = {"superlink_port": self.superlink_port, "enrollment_port": self.enrollment_port}
        if self.control_port:
            ports["control_port"] = self.control_port
        if len(set(ports.values())) < len(ports):
            listed = ", ".join(f"{name} = {port}" for name, port in ports.items())
            raise ValueError(f"the coordinator's ports must differ ({listed})")
        return self


class StateDir:
    """Paths inside a coordinator state directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    ca_certificate = property(lambda self: self.root / "ca.pem")
    ca_key = property(lambda self: self.root / "ca.key")
    server_certificate = property(lambda self: self.root / "server.pem")
    server_key = property(lambda self: self.root / "server.key")
    settings_file = property(lambda self: self.root / SETTINGS)
    pid_file = property(lambda self: self.root / "coordinator.pid")  # while `start` runs
    audit_key = property(lambda self: self.root / "audit.key")
    audit_head = property(lambda self: self.root / "audit.head")
    audit_lock = property(lambda self: self.root / "audit.lock")
    superlink_database = property(lambda self: self.root / "superlink.db")
    flwr_home = property(lambda self: self.root / "flwr")
    logs = property(lambda self: self.root / "logs")
    jobs = property(lambda self: self.root / "jobs")  # the Flower app of each submitted job
    runs = property(lambda self: self.root / "runs")  # results, one folder per run
    models = property(lambda self: self.root / "models")  # the registry's files, NAME/VERSION

    def database_url(self, settings: ServerSettings) -> str:
        return settings.database.replace("{state}", str(self.root.resolve()))

    def save_settings(self, settings: ServerSettings) -> None:
        write_atomic(self.settings_file, tomli_w.dumps(settings.model_dump()))

    def load_settings(self) -> ServerSettings:
        path = self.settings_file
        if not path.is_file():
            raise StateError(
                f"{self.root}: not a coordinator state directory (no {SETTINGS}); "
                "create one with `confide-server init`"
            )
        try:
            return validate_file(read_toml(path), ServerSettings, path=path, what="settings")
        except ConfigFileError as error:
            raise StateError(str(error)) from error
