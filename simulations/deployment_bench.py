"""`confide-simulate bench --deployed`: seconds per round of a real deployment on this host.

It runs what an operator and two institutions would run, as separate processes on 127.0.0.1:
`confide-server init` and `start`, two join tokens, two `confide-client join` (each with its
own share of the digits data, exported as CSV), then `confide-server submit` of a DP job, and
reads the round times from the run's results.json. Everything happens in a temporary folder
and is stopped afterwards.

The section it writes into docs/benchmarks.md sits between two markers; the simulation
benchmark keeps it when it rewrites the rest of the file, and the other way round.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from confide.common.environment import (
    FLOWER_DEFAULTS,
    executable,
    stop_process_group,
    wait_until_listening,
)
from confide.common.errors import DeploymentBenchError
from confide.server.results import RESULTS, Results, median_after_first
from confide.simulations.export import export_institutions
from confide.simulations.scenario import load_scenario

START = "<!-- deployed-bench:start -->"
END = "<!-- deployed-bench:end -->"
INSTITUTIONS = 2
STARTUP_SECONDS = 120.0


@dataclass
class DeployedMeasurement:
    variant: str
    rounds: int
    seconds: list[float]
    total_seconds: float
    accuracy: float
    epsilon_max: float

    @property
    def median_round(self) -> float:
        return median_after_first(self.seconds)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _cli(*args: str, timeout: float = 120.0) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        output = f"{result.stdout.strip()[-2000:]}\n{result.stderr.strip()}"
        raise DeploymentBenchError(
            f"{' '.join(args[:3])} exited with {result.returncode}: {output}"
        )
    return result.stdout


def _start(stack: ExitStack, *command: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    stack.callback(stop_process_group, process, 30.0)
    return process


def clientapp_import_seconds(repeats: int = 3) -> float:
    """Median wall time of a fresh process importing the ClientApp: what Flower's process per
    message paid on every message, and what confide's warm runner saves."""
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import confide.client.app"], check=True)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


# (label, federation.fraction_evaluate): each round's messages are train (+ evaluate).
VARIANTS = (("train + federated evaluation", 1.0), ("train only", 0.0))


def _job(rounds: int, fraction_evaluate: float) -> str:
    return f"""
name = "digits-deployed-bench"
seed = 0
[task]
name = "digits"
[train]
batch_size = 64
lr = 1.0
[privacy]
target_epsilon = 8.0
delta = 1e-5
[federation]
rounds = {rounds}
fraction_evaluate = {fraction_evaluate}
min_available = {INSTITUTIONS}
min_train = {INSTITUTIONS}
min_evaluate = {INSTITUTIONS if fraction_evaluate else 0}
timeout = 300
"""


def measure_deployed(rounds: int) -> list[DeployedMeasurement]:
    """Run a coordinator and two institutions on this host and time a `rounds`-round DP job,
    with and without federated evaluation, one after the other on the same deployment."""
    os.environ.update(FLOWER_DEFAULTS)
    server, client = executable("confide-server"), executable("confide-client")
    with tempfile.TemporaryDirectory(prefix="confide-bench-") as scratch, ExitStack() as stack:
        root = Path(scratch)
        state = root / "coordinator"
        superlink, enrollment = _free_port(), _free_port()
        _cli(server, "init", "--dir", str(state), "--bind", "127.0.0.1",
             "--superlink-port", str(superlink), "--enrollment-port", str(enrollment))  # fmt: skip
        coordinator = _start(stack, server, "start", "--dir", str(state), log=root / "server.log")
        try:
            wait_until_listening(enrollment, coordinator, STARTUP_SECONDS)
        except (ChildProcessError, TimeoutError) as error:
            raise DeploymentBenchError(f"the coordinator {error}") from None
        scenario = load_scenario(
            "digits-dp", {"simulation": {"institutions": INSTITUTIONS}}, fit_minimums=True
        )
        for index, data in enumerate(export_institutions(scenario, root / "data")):
            name = f"hospital-{index}"
            token = root / f"{name}.token"
            token.write_text(
                _cli(server, "token", "create", "--dir", str(state), "--institution", name)
            )
            _cli(client, "join", "--server", f"127.0.0.1:{enrollment}", "--token-file",
                 str(token), "--dir", str(root / name), "--data", str(data), "--port",
                 str(_free_port()), "--no-start",
                 # Two target-epsilon-8 jobs on the same data: the default limit (10) would
                 # refuse the second; the benchmark times rounds, not the limit.
                 "--max-epsilon", "100")  # fmt: skip
            _start(stack, client, "start", "--dir", str(root / name), log=root / f"{name}.log")
        return [
            _run_job(server, state, root, rounds=rounds, label=label, fraction=fraction)
            for label, fraction in VARIANTS
        ]


def _run_job(
    server: str, state: Path, root: Path, *, rounds: int, label: str, fraction: float
) -> DeployedMeasurement:
    job = root / f"job-{fraction:g}.toml"
    job.write_text(_job(rounds, fraction))
    # The institutions were just started: wait for them to come online (submit refuses a
    # job whose minimums are not online).
    output = _cli(
        server, "submit", str(job), "--dir", str(state), "--wait", "120",
        timeout=60.0 * rounds + 420,
    )  # fmt: skip
    run_id = output.split("as run ")[1].split(";")[0].strip()
    results_file = state / "runs" / f"run-{run_id}" / RESULTS
    if not results_file.is_file():
        raise DeploymentBenchError(f"run {run_id} wrote no results; output:\n{output}")
    results = Results.model_validate_json(results_file.read_text())
    if results.final.epsilon_max is None:
        raise DeploymentBenchError(f"run {run_id} trained without DP; its job asks for DP")
    return DeployedMeasurement(
        variant=label,
        rounds=rounds,
        seconds=[r.seconds for r in results.rounds],
        total_seconds=results.timing.total_seconds,
        accuracy=results.final.accuracy,
        epsilon_max=results.final.epsilon_max,
    )


def deployed_section(measured: list[DeployedMeasurement], import_seconds: float) -> str:
    """The Markdown section for docs/benchmarks.md, between its markers."""
    first = measured[0]
    lines = [
        START,
        "## Deployed rounds (coordinator + 2 institutions on one host)",
        "",
        "Generated by `confide-simulate bench --deployed`: `confide-server init/start`, two "
        "join tokens, two `confide-client join/start`, then `confide-server submit` of a "
        f"{first.rounds}-round DP-SGD job (digits, batch 64, target epsilon 8) twice, with and "
        "without federated evaluation, all as separate processes over TLS on 127.0.0.1, "
        f"sharing this machine's {_cpus()} CPUs.",
        "",
        "| job | s/round (median r2..) | round 1 s | all rounds s | test accuracy "
        "| max epsilon | seconds of each round |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        each = ", ".join(f"{s:.1f}" for s in m.seconds)
        lines.append(
            f"| {m.variant} | {m.median_round:.1f} | {m.seconds[0]:.1f} | "
            f"{m.total_seconds:.1f} | {m.accuracy:.4f} | {m.epsilon_max:.3f} | {each} |"
        )
    lines += [
        "",
        f"A fresh process importing confide's ClientApp: {import_seconds:.2f} s "
        "(median of 3): what each message cost before confide's runner, and what the runner "
        "saves per message now.",
        "",
        "Before the runner (2026-12-01, the same jobs and machine, Flower's SuperExec "
        "starting a new `flwr-clientapp` process per message): 26.3 s per round with "
        "federated evaluation, 16.6 s train only.",
        "",
        "What a round is made of. Each message (train; then evaluate, unless "
        "`federation.fraction_evaluate = 0`) goes through these steps at each institution:",
        "",
        "| step | seconds | whose |",
        "|---|---|---|",
        "| the SuperNode notices the message: it sleeps 3 s after an empty pull | 0-3 | "
        "Flower 1.41, hard-coded |",
        "| confide's runner (one warm process per institution, `confide.client.runner`) takes "
        "the task (it asks the SuperNode every 0.2 s) and checks the run's app | 0-0.2 | "
        "confide |",
        "| train: DP-SGD on ~650 examples and the institution's limit check; the first "
        "message of a runner also imports Opacus (about 2 s) | 0.1-0.5 | confide |",
        "| evaluate: scoring ~70 validation examples | 0.1 | confide |",
        "| the reply travels back (SuperNode checks for replies every 0.5 s) and the "
        "ServerApp collects it | 1-1.5 | Flower / confide |",
        "",
        "What confide does to cut it:",
        "",
        "- the runner imports torch, Opacus and confide once, not per message, and runs the "
        "verified ClientApp in its own process (no `flwr-clientapp` process per message);",
        "- the ServerApp collects replies every 0.1 s instead of the 3 s of Flower's "
        "deployed grid (`confide.server.polling.PromptGrid`);",
        "- the coordinator's SuperExec looks for ServerApps to start every 0.1 s instead of "
        "1 s (`FLWR_SUPEREXEC_TASK_POLL_INTERVAL`);",
        "- the noise multiplier for a target epsilon (a bisection over the accountant, "
        "4-6 s) is computed once per job and kept in the node's state;",
        "- turning federated evaluation off halves the messages per round (second row).",
        "",
        "Not cut: the SuperNode's 3 s pull interval is Flower's (hard-coded), so a message "
        "waits 1.5 s on average before anyone sees it. Here two institutions, the SuperLink "
        "and the ServerApp share 2 CPUs, and round times vary with the machine's load; "
        "institutions on their own machines are faster.",
        END,
    ]
    return "\n".join(lines)


def _cpus() -> int:
    return os.cpu_count() or 1


def replace_section(document: str, section: str, markers: tuple[str, str] = (START, END)) -> str:
    """`document` with the section between `markers` (the deployed bench's by default)
    replaced by `section` (appended if absent)."""
    start, end = markers
    if start in document and end in document:
        before = document[: document.index(start)]
        after = document[document.index(end) + len(end) :]
        return before + section + after
    return document.rstrip("\n") + "\n\n" + section + "\n"


def kept_section(document: str, markers: tuple[str, str] = (START, END)) -> str | None:
    """The section between `markers` of an existing document, to carry over on a rewrite."""
    start, end = markers
    if start in document and end in document:
        return document[document.index(start) : document.index(end) + len(end)]
    return None
