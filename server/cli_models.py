"""`confide-server models`: the coordinator's registered models (confide.server.model_registry).

Kept apart from confide.server.cli, which adds this group, so that each file stays one concern.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from confide.common.terminal import output_console

if TYPE_CHECKING:
    from confide.server.model_file import ModelCard
    from confide.server.model_registry import ModelRegistry

models_app = typer.Typer(
    help="Registered models: every deployed run's model, versioned per name (NAME:VERSION).",
    no_args_is_help=True,
)
console = output_console()

StateOption = Annotated[Path, typer.Option("--dir", help="the coordinator's state directory")]
VersionArgument = Annotated[str, typer.Argument(help="NAME:VERSION, e.g. digits-mlp:3")]


def _registry(state: Path) -> ModelRegistry:
    from confide.server.model_registry import ModelRegistry
    from confide.server.settings import StateDir
    from confide.server.state import open_database

    directory = StateDir(state)
    engine = open_database(directory.database_url(directory.load_settings()))
    return ModelRegistry(directory, engine)


def _epsilon(card: ModelCard) -> str:
    """The model's sample-level bound over its lineage (`ModelCard.bound`)."""
    bound = card.bound
    if bound.sample_epsilon is None or bound.sample_delta is None:
        return "no DP"
    if bound.sample_epsilon == "unbounded":
        return "unbounded"
    return f"{bound.sample_epsilon:.3g} (delta {bound.sample_delta:g})"


@models_app.command("list")
def models_list(
    state: StateOption,
    name: Annotated[str | None, typer.Option(help="only this model's versions")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object a line")] = False,
) -> None:
    """Every registered version: its task, round, test accuracy, epsilon bound (over its
    lineage) and hash."""
    from rich.table import Table

    versions = _registry(state).versions(name)
    if as_json:
        for model in versions:
            row = {
                "version": model.reference,
                "sha256": model.sha256,
                "run": model.run,
                "created": model.created_at.isoformat(),
            }
            print(json.dumps(row | {"card": model.card.model_dump(mode="json")}))
        return
    table = Table(title=f"Models registered at {state}")
    for column in ("version", "task", "run", "round", "accuracy", "epsilon bound", "sha256"):
        table.add_column(column)
    for model in versions:
        card = model.card
        accuracy = card.metrics.get("accuracy")
        table.add_row(
            model.reference,
            str(card.task.get("name")),
            model.run,
            str(card.run.round),
            f"{accuracy:.4f}" if accuracy is not None else "-",
            _epsilon(card),
            model.sha256[:12],
        )
    console.print(table)
    if not versions:
        console.print("no model registered yet: a deployed run registers its model when it ends")


@models_app.command("show")
def models_show(version: VersionArgument, state: StateOption) -> None:
    """A version's card: architecture, metrics, privacy provenance and lineage (JSON)."""
    model = _registry(state).get(version)
    print(model.card.model_dump_json(indent=2))


@models_app.command("export")
def models_export(
    version: VersionArgument,
    state: StateOption,
    out: Annotated[Path, typer.Option(help="folder for model.safetensors and model.json")],
) -> None:
    """Copy a version's files out of the registry, after checking their hash."""
    paths = _registry(state).export(version, out)
    for path in paths:
        console.print(str(path), highlight=False)
