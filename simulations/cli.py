"""`confide-simulate`: run, list and benchmark federated scenarios on one machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from confide.common.terminal import RefusingGroup, fail
from confide.simulations.environment import apply_defaults

apply_defaults()  # before Flower or Ray is imported anywhere

app = typer.Typer(
    help="Simulate federated training with differential privacy: many virtual institutions "
    "on this machine (Flower's simulation engine on Ray).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=RefusingGroup,
)
console = Console()


def overrides(
    *,
    rounds: int | None,
    institutions: int | None,
    seed: int | None,
    device: str | None,
    init_model: Path | None = None,
) -> dict[str, Any]:
    """CLI flags as a partial scenario; they win over the file's values."""
    tree: dict[str, Any] = {}
    if init_model is not None:
        tree["model"] = {"init": str(init_model)}
    if rounds is not None:
        tree.setdefault("federation", {})["rounds"] = rounds
    if institutions is not None:
        tree.setdefault("simulation", {})["institutions"] = institutions
    if seed is not None:
        tree["seed"] = seed
    if device is not None:
        tree.setdefault("simulation", {})["device"] = device
    return tree


@app.command()
def run(
    *,
    scenario: Annotated[
        str | None,
        typer.Argument(help="a scenario file, or a bundled name (see list); none with --resume"),
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="override federation.rounds")] = None,
    institutions: Annotated[
        int | None,
        typer.Option(help="override simulation.institutions (the minimums shrink to fit)"),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="override the seed")] = None,
    out: Annotated[Path, typer.Option(help="results are written to OUT/<scenario>-<time>/")] = Path(
        "results"
    ),
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    state: Annotated[
        Path | None,
        typer.Option(
            help="the virtual institutions' privacy ledgers (STATE/institution-<i>); give a "
            "previous run's OUT/<run>/state to continue its spend [default: OUT/<run>/state]"
        ),
    ] = None,
    init_model: Annotated[
        Path | None,
        typer.Option(
            help="start from a saved model (an earlier run's model.safetensors, its model.json "
            "beside it); its run's ledgers are continued unless --state says otherwise"
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress display")] = False,
    verbose: Annotated[bool, typer.Option(help="show Flower's and Ray's logs")] = False,
    baseline: Annotated[
        bool,
        typer.Option(
            help="with \\[attack] or \\[faults]: then run the clean twin (the scenario without "
            "them, same seed) and report the accuracy they cost"
        ),
    ] = True,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="finish the interrupted run in this folder (OUT/<run>) from its checkpoint, "
            "with its own scenario and ledgers"
        ),
    ] = None,
) -> None:
    """Run a scenario and write results.json, privacy.json, plots, the resolved config and the
    trained model (model.safetensors and its card, model.json). Each round is checkpointed in
    the run's folder until it finishes: `--resume OUT/<run>` finishes a run that was
    interrupted, with the model an uninterrupted run would have ended with."""
    from confide.simulations.runner import run_and_report

    changed = [rounds, institutions, seed, device, state, init_model]
    if resume is not None and (scenario is not None or any(v is not None for v in changed)):
        raise fail("--resume continues a run as it started: give no scenario, and no overrides")
    if resume is None and scenario is None:
        raise fail("give a scenario (a file, or a bundled name), or --resume OUT/<run>")
    run_and_report(
        scenario or "",
        overrides(
            rounds=rounds,
            institutions=institutions,
            seed=seed,
            device=device,
            init_model=init_model,
        ),
        out,
        console=console,
        quiet=quiet,
        verbose=verbose,
        fit_minimums=institutions is not None,
        state=state,
        baseline=baseline,
        resume=resume,
    )


@app.command("list")
def list_scenarios() -> None:
    """List the bundled scenarios and the tasks a scenario can name (built-in and installed)."""
    from confide.simulations.scenario import bundled_scenarios, load_scenario
    from confide.tasks.registry import list_tasks, refused_tasks

    table = Table(title="Bundled scenarios (confide-simulate run NAME)")
    for column in ("name", "institutions", "rounds", "DP", "description"):
        table.add_column(column)
    for name, path in sorted(bundled_scenarios().items()):
        scenario = load_scenario(str(path))
        table.add_row(
            name,
            str(scenario.simulation.institutions),
            str(scenario.federation.rounds),
            scenario.privacy.describe(),
            scenario.description,
        )
    console.print(table)
    tasks = Table(title="Tasks (scenario: \\[task] name = NAME)")
    for column in ("name", "from", "description"):
        tasks.add_column(column)
    for task in list_tasks():
        tasks.add_row(task.name, task.source, task.description)
    console.print(tasks)
    for refusal in refused_tasks():  # an installed task that cannot be used, and why
        console.print(f"refused: {refusal}", highlight=False)


@app.command()
def bench(
    *,
    scenario: Annotated[str, typer.Argument(help="the workload")] = "digits-dp",
    rounds: Annotated[int, typer.Option(help="rounds per variant")] = 15,
    output: Annotated[Path, typer.Option(help="the Markdown report")] = Path("docs/benchmarks.md"),
    scale: Annotated[
        bool,
        typer.Option(
            help="also run synthetic-10000 (10,000 institutions) under confide (DP on, DP "
            "off) and plain Flower, and check the round-time target (at most 0.5x plain "
            "Flower's)"
        ),
    ] = False,
    deployed: Annotated[
        bool,
        typer.Option(
            help="instead: time a real coordinator and 2 institutions on 127.0.0.1 "
            "(ROUNDS rounds), then 10 institutions on one host (3 rounds: time, memory, no "
            "round recorded twice), and update only that section of OUTPUT"
        ),
    ] = False,
    accountants: Annotated[
        bool,
        typer.Option(
            help="instead: accuracy at the same target epsilon with sigma calibrated by RDP "
            "and by PLD, on digits-dp and breast-cancer-dp (or SCENARIO if given), over "
            "--seeds seeds; updates only that section of OUTPUT"
        ),
    ] = False,
    seeds: Annotated[int, typer.Option(min=1, max=20, help="seeds per --accountants row")] = 3,
    robust: Annotated[
        bool,
        typer.Option(
            help="instead: attacks x aggregation rules (x DP off/on) on digits with 20 "
            "institutions, 30% attacking (ROUNDS rounds each); updates only that section "
            "of OUTPUT"
        ),
    ] = False,
) -> None:
    """Compare DP off, DP on and plain Flower on one workload; write the ratios to OUTPUT."""
    from confide.simulations.bench import run_benchmarks, run_deployed_benchmark

    if robust:
        from confide.simulations.robust_bench import run_robust_benchmark

        run_robust_benchmark(rounds, output, console=console)
    elif accountants:
        from confide.simulations.accountant_bench import run_accountant_benchmark

        default = scenario == "digits-dp"
        names = ["digits-dp", "breast-cancer-dp"] if default else [scenario]
        run_accountant_benchmark(names, output, seeds=seeds, console=console)
    elif deployed:
        run_deployed_benchmark(rounds, output, console=console)
    else:
        run_benchmarks(scenario, rounds, output, scale=scale, console=console)


@app.command()
def export(
    *,
    scenario: Annotated[str, typer.Argument(help="a scenario file, or a bundled name")],
    out: Annotated[
        Path, typer.Option(help="folder for institution-<i>.csv (.npz for images)")
    ] = Path("data"),
    institutions: Annotated[
        int | None, typer.Option(help="override simulation.institutions")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="override the seed")] = None,
) -> None:
    """Write each virtual institution's data as a CSV (images: NPZ) file, to try a
    deployment locally."""
    from confide.simulations.export import export_institutions
    from confide.simulations.runner import prepare

    try:
        chosen = overrides(rounds=None, institutions=institutions, seed=seed, device=None)
        loaded = prepare(scenario, chosen, True)
        paths = export_institutions(loaded, out)
    except OSError as error:
        raise fail(str(error)) from None
    for path in paths:
        note = "  (label column: label)" if path.suffix == ".csv" else ""
        console.print(f"{path}{note}", highlight=False)


@app.command()
def predict(
    *,
    model: Annotated[Path, typer.Argument(help="a saved model.safetensors (model.json beside it)")],
    data: Annotated[
        Path | None,
        typer.Argument(help="a CSV or NPZ file in the task's format [default: the run's test set]"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="write one row per example: prediction, probabilities")
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="the CSV's label column [default: the task's]")
    ] = None,
    test_split: Annotated[
        bool,
        typer.Option(
            help="DATA is the file the model's task read (csv, npz, images): score the "
            "held-out test set its run scored"
        ),
    ] = False,
) -> None:
    """Score data with a saved model; print the metrics when the data has labels."""
    from confide.simulations.predict import predict as score
    from confide.simulations.predict import write_predictions

    if test_split and data is None:
        raise fail("--test-split needs DATA: the file the model's task read")
    predictions = score(model, data, label_column=label_column, test_split=test_split)
    console.print(f"model: {predictions.card.describe()}", highlight=False)
    console.print(
        f"scored {len(predictions.predicted)} examples of {predictions.source}", highlight=False
    )
    if predictions.metrics is not None:
        table = Table(title="metrics")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in predictions.metrics.items():
            table.add_row(name, f"{value:.6f}")
        console.print(table)
    if out is not None:
        try:
            write_predictions(out, predictions)
        except OSError as error:
            raise fail(f"--out {out}: {error}") from None
        console.print(f"predictions written to {out}", highlight=False)


def main() -> None:
    app(prog_name="confide-simulate")


if __name__ == "__main__":
    main()
