"""`confide-client`: join a coordinator and run this institution's SuperNode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from confide.tasks.terminal import fail

if TYPE_CHECKING:
    pass

app = typer.Typer(
    help="Join a confide coordinator as an institution and train on local data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
DirOption = Annotated[Path, typer.Option("--dir", help="this institution's state directory")]


def _check_data(path: Path, label_column: str) -> None:
    """Refuse unreadable data before anything is registered."""
    from confide.tasks.datasets import DatasetError, load_csv, load_npz

    try:
        if path.suffix.lower() == ".npz":
            load_npz(path)
        else:
            load_csv(path, label_column)
    except DatasetError as error:
        raise fail(f"--data: {error}") from None


@app.command()
def join(
    server: Annotated[str, typer.Option(help="the coordinator's enrollment service, HOST:PORT")],
    token: Annotated[str, typer.Option(help="the join token from `confide-server token create`")],
    state: DirOption,
    data: Annotated[
        Path, typer.Option(help="local training data: CSV (with a label column) or NPZ")
    ],
    label_column: Annotated[str, typer.Option(help="CSV label column")] = "label",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    port: Annotated[int, typer.Option(help="this SuperNode's local port")] = 9094,
    start: Annotated[bool, typer.Option(help="start the SuperNode after joining")] = True,
) -> None:
    """Verify the coordinator by the token's CA fingerprint, register a new key, then run."""
    from confide.client.enrollment import JoinError
    from confide.client.enrollment import join as enroll
    from confide.client.institution import InstitutionConfig, InstitutionDir

    directory = InstitutionDir(state)
    if directory.settings_file.exists():
        raise fail(f"{state} already holds an institution; use `confide-client start`")
    _check_data(data, label_column)
    try:
        enrollment = enroll(server, token, directory)
    except JoinError as error:
        raise fail(str(error)) from None
    config = InstitutionConfig(
        name=enrollment.institution,
        node_id=enrollment.node_id,
        superlink=enrollment.superlink,
        enrollment=server,
        data=data.resolve(),
        label_column=label_column,
        device=device,
        port=port,
    )
    directory.save(config)
    console.print(
        f"joined as {config.name} (node {config.node_id}); credentials in {state}", highlight=False
    )
    if start:
        run_supernode(directory)


def run_supernode(directory) -> None:
    from confide.client.institution import InstitutionError

    try:
        config = directory.load()
    except InstitutionError as error:
        raise fail(str(error)) from None
    node_config = (
        f'data-path="{config.data}" label-column="{config.label_column}" '
        f'device="{config.device}" institution="{config.name}"'
    )
    command = [
        str(Path(sys.executable).with_name("flower-supernode")),
        "--root-certificates",
        str(directory.ca_certificate),
        "--superlink",
        config.superlink,
        "--auth-supernode-private-key",
        str(directory.private_key),
        "--node-config",
        node_config,
        "--port",
        str(config.port),
    ]
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    console.print(
        f"SuperNode for {config.name} connecting to {config.superlink} (TLS)", highlight=False
    )
    process = subprocess.Popen(command, env=env, start_new_session=True)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: os.killpg(process.pid, signal.SIGTERM))
    code = process.wait()
    raise typer.Exit(code=0 if code in (0, -signal.SIGTERM) else code)


@app.command()
def start(state: DirOption) -> None:
    """Run this institution's SuperNode with the credentials saved by `join`."""
    from confide.client.institution import InstitutionDir

    run_supernode(InstitutionDir(state))


def main() -> None:
    app(prog_name="confide-client")


if __name__ == "__main__":
    sys.exit(main())
