"""`confide-server start` as an operator runs it: real SuperLink and enrollment over TLS."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import threading
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from helpers import (
    BIN,
    Started,
    cli,
    confide,
    flower_environment,
    flwr_json,
    free_port,
    new_token,
    openssh_key,
    running_coordinator,
    wait_until,
)

from confide.client.supernode import CONNECTED, REVOKED_MESSAGE
from confide.privacy.ledger import Ledger
from confide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """The coordinator of this module, serving /metrics on a port of its own (given as
    `confide-server start` reads it from the environment, as compose passes it)."""
    metrics = free_port()
    state = tmp_path_factory.mktemp("coordinator") / "state"
    with running_coordinator(state, {"CONFIDE_METRICS_PORT": str(metrics)}) as running:
        yield running | {"metrics": metrics}


def server_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return cli("confide-server", *args)


def client_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return cli("confide-client", *args)


def register(coordinator, token: str) -> enrollment_pb2.RegisterResponse:
    ca = (coordinator["state"] / "ca.pem").read_bytes()
    channel = grpc.secure_channel(
        f"127.0.0.1:{coordinator['enrollment']}", grpc.ssl_channel_credentials(ca)
    )
    request = enrollment_pb2.RegisterRequest(token=token, public_key_openssh=openssh_key()[1])
    return enrollment_pb2_grpc.EnrollmentStub(channel).Register(request, timeout=60)


def supernodes(coordinator) -> dict[str, str]:
    """Node id -> status, as the SuperLink lists them."""
    nodes = flwr_json(coordinator["state"] / "flwr", "supernode", "list", "confide")["nodes"]
    return {node["node-id"]: node["status"] for node in nodes}


def test_start_reports_where_both_services_listen(coordinator):
    banner = coordinator["started"].output
    assert f"127.0.0.1:{coordinator['superlink']}" in banner
    assert f"127.0.0.1:{coordinator['enrollment']}" in banner
    leaf = ssl.get_server_certificate(("127.0.0.1", coordinator["enrollment"]))
    assert "BEGIN CERTIFICATE" in leaf


def test_a_token_registers_the_institution_with_the_superlink(coordinator):
    token = new_token(coordinator["state"], "hospital-a")
    reply = register(coordinator, token)
    assert reply.institution == "hospital-a" and reply.node_id > 0
    assert str(reply.node_id) in supernodes(coordinator)
    with pytest.raises(grpc.RpcError) as reused:
        register(coordinator, token)
    assert reused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "local.csv"
    rows = ["a,b,label"] + [f"{i},{i % 7},{i % 2}" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    return path


def join(coordinator, data_file: Path, state: Path, name: str, *extra: str) -> str:
    """Join `name` into `state` without starting it; return its node id."""
    joined = client_cli(
        "join",
        "--server",
        f"127.0.0.1:{coordinator['enrollment']}",
        "--token",
        new_token(coordinator["state"], name),
        "--dir",
        str(state),
        "--data",
        str(data_file),
        "--port",
        str(free_port()),
        "--no-start",
        *extra,
    )
    assert joined.returncode == 0, joined.stderr
    return str(tomllib.loads((state / "institution.toml").read_text())["node_id"])


def start_client(state: Path, *extra: str) -> Started:
    return confide("confide-client start", "--dir", str(state), *extra)


def plain(text: str) -> str:
    """`text` with its line breaks and runs of spaces folded (a console wraps long lines)."""
    return " ".join(text.split())


@pytest.fixture
def plaintext_server() -> Iterator[int]:
    """A port where a server answers in plaintext (HTTP) whatever it is sent."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return  # closed
            with connection:
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def test_join_refusals_leave_nothing_registered(coordinator, data_file, tmp_path, plaintext_server):
    server = f"127.0.0.1:{coordinator['enrollment']}"
    token = new_token(coordinator["state"], "hospital-d")
    before = set(supernodes(coordinator))

    def join_with(token: str, folder: str, *, server: str = server, data: Path = data_file):
        return client_cli(
            "join", "--server", server, "--token", token, "--dir", str(tmp_path / folder),
            "--data", str(data), "--no-start",
        )  # fmt: skip

    # A token whose CA fingerprint is not this coordinator's: refused before registering.
    refused = join_with(token[:-64] + "0" * 64, "d1")
    assert refused.returncode == 2 and "CA fingerprint mismatch" in refused.stderr
    # No TLS at the address: refused, never downgraded to plaintext.
    plaintext = join_with(token, "d2", server=f"127.0.0.1:{plaintext_server}")
    assert plaintext.returncode == 2 and "TLS" in plaintext.stderr
    # Unreadable data: refused before anything is registered.
    bad = join_with(token, "d3", data=tmp_path / "missing.csv")
    assert bad.returncode == 2 and "--data" in bad.stderr
    assert set(supernodes(coordinator)) == before
    # The token survived all of that; once used, it is refused.
    ok = join_with(token, "d4")
    assert ok.returncode == 0, ok.stderr
    again = join_with(token, "d5")
    assert again.returncode == 2 and "already used" in again.stderr
    assert not (tmp_path / "d5" / "institution.toml").exists()


def test_revoked_institution_is_cut_off_and_cannot_return(coordinator, data_file, tmp_path):
    state = tmp_path / "hospital-e"
    node_id = join(coordinator, data_file, state, "hospital-e")
    supernode = start_client(state)
    try:
        supernode.wait_for(CONNECTED, 90)
        listed = server_cli("institutions", "list", "--dir", str(coordinator["state"]))
        assert "hospital-e" in listed.stdout and "online" in listed.stdout, listed.stdout
        revoked = server_cli(
            "institutions", "revoke", "hospital-e", "--dir", str(coordinator["state"])
        )
        assert revoked.returncode == 0, revoked.stderr
        # Cut off: the connected SuperNode is refused at its next request, and `start` fails
        # saying why.
        wait_until(
            lambda: supernode.process.poll() is not None,
            seconds=90,
            what="`start` of the revoked institution to end",
            details=lambda: supernode.output,
        )
    finally:
        code = supernode.finish()
    assert code == 1 and REVOKED_MESSAGE in plain(supernode.output), supernode.output
    assert supernodes(coordinator).get(node_id) in (None, "unregistered")
    # The old key cannot come back: the SuperLink refuses to activate it.
    returning = start_client(state)
    try:
        returning.wait_for("the coordinator refused to activate this SuperNode", 90)
        assert supernodes(coordinator).get(node_id) in (None, "unregistered")
    finally:
        returning.finish()
    again = server_cli("institutions", "revoke", "hospital-e", "--dir", str(coordinator["state"]))
    assert again.returncode == 2 and "already revoked" in again.stderr


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory) -> list[Path]:
    """Two institutions' CSV files cut from the digits examples the coordinator's test set
    excludes; the second holds no 9s, so labels must be encoded with the job's classes."""
    from confide.tasks.config import DataConfig, TaskConfig
    from confide.tasks.splits import federate

    folder = tmp_path_factory.mktemp("digits")
    split = federate(
        TaskConfig(name="digits"), DataConfig(validation_fraction=0.0), institutions=2, seed=0
    )
    paths = []
    for index, local in enumerate(split.institutions):
        keep = local.train.y != 9 if index == 1 else local.train.y >= 0
        lines = [",".join([*(f"p{j}" for j in range(64)), "digit"])]
        lines += [
            ",".join([*(f"{value:.4f}" for value in row), str(label)])
            for row, label in zip(local.train.x[keep], local.train.y[keep], strict=True)
        ]
        paths.append(folder / f"hospital-{index}.csv")
        paths[-1].write_text("\n".join(lines) + "\n")
    return paths


def check_privacy_report(folder: Path, results: dict, run_id: str, tmp_path: Path) -> None:
    """privacy.json's numbers recompute from its parameters, and each institution's own
    ledger and `confide-client budget` agree with what the coordinator reports."""
    from confide.privacy.accounting import epsilon
    from confide.privacy.config import CentralPrivacyConfig
    from confide.server.central_dp import central_epsilon

    report = json.loads((folder / "privacy.json").read_text())
    central = report["institution_level"]
    assert central["institutions_asked_per_round"] == [2, 2]
    config = CentralPrivacyConfig(enabled=True, noise_multiplier=0.02, clipping_norm=2.0)
    assert central["epsilon"] == pytest.approx(central_epsilon(config, [2, 2]))
    assert results["privacy"]["institution_level"]["epsilon"] == central["epsilon"]
    # The deployed statement says exactly what drew the noise (audit finding 3).
    statement = report["statement"]
    assert "the operating system's CSPRNG (os.urandom) for every noise value (2 institutions)" in (
        statement
    )
    assert "NumPy's PCG64 generator (not a cryptographic generator) seeded with 128 bits" in (
        statement
    )
    assert "secret source" not in statement
    assert report["sample_level"]["neighbouring"] == "add-remove"
    for row in report["sample_level"]["institutions"]:
        settings = tomllib.loads((tmp_path / row["id"] / "institution.toml").read_text())
        assert row["declared_examples"] == settings["declared_examples"]
        assert row["noise_generator"] == "os-csprng"
        history = [(row["noise_multiplier"], row["sample_rate"], row["steps"])]
        assert row["epsilon"] == pytest.approx(epsilon(history, 1e-5, "pld"), rel=1e-9)
        # Their first job, stated by their own ledgers with RDP (a looser bound than PLD).
        assert row["dataset_accountant"] == "rdp"
        assert row["dataset_epsilon"] == pytest.approx(epsilon(history, 1e-5, "rdp"))
        assert row["dataset_epsilon"] > row["epsilon"]
        state = tmp_path / row["id"]
        entries = [e for e in Ledger(state).entries() if e.kind == "spend"]
        assert [(e.job, e.run, e.round) for e in entries] == [
            ("digits-deployed", run_id, 1),
            ("digits-deployed", run_id, 2),
        ]
        shown = client_cli("budget", "--dir", str(state), "--json")
        assert json.loads(shown.stdout)[0]["epsilon"] == pytest.approx(row["dataset_epsilon"])


JOB = """
name = "digits-deployed"
seed = 0
[task]
name = "digits"
[train]
batch_size = 64
lr = 1.0
[privacy]
target_epsilon = 8.0
delta = 1e-5
# The tighter accountant, deployed: it calibrates sigma and reports the job's epsilon; each
# institution states its ledger's cumulative epsilon with its own accountant (RDP here).
accountant = "pld"
# Wiring only: two institutions cannot get a useful institution-level epsilon (this one is in
# the thousands); the test checks that the noise is added and accounted, not its strength.
[central_privacy]
enabled = true
noise_multiplier = 0.02
clipping_norm = 2.0
[federation]
rounds = 2
min_available = 2
min_train = 2
min_evaluate = 2
timeout = 180
"""


@pytest.fixture(scope="module")
def federation(coordinator, digits_files, tmp_path_factory):
    """Two institutions (train-0, train-1) joined with digits data and started once for the
    tests that run jobs; their state folders are under `root`."""
    root = tmp_path_factory.mktemp("federation")
    running, ids, metrics = [], [], [free_port() for _ in digits_files]
    try:
        for index, data in enumerate(digits_files):
            state = root / f"train-{index}"
            ids.append(join(coordinator, data, state, f"train-{index}", "--label-column", "digit"))
            assert (state / "institution.key").stat().st_mode & 0o777 == 0o600
            running.append(start_client(state, "--metrics-port", str(metrics[index])))
        for index, started in enumerate(running):
            started.wait_for(f"taking train-{index}'s tasks", 120)
        status = supernodes(coordinator)
        assert all(status.get(node) == "online" for node in ids), (ids, status)
        yield {
            "root": root,
            "states": [root / "train-0", root / "train-1"],
            "ids": ids,
            "metrics": metrics,
            "started": running,
        }
    finally:
        for started in running:
            started.finish()


def submit(coordinator, job_text: str, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    job = folder / "job.toml"
    job.write_text(job_text)
    return cli(
        "confide-server", "submit", str(job), "--dir", str(coordinator["state"]), *extra,
        timeout=400,
    )  # fmt: skip


def flwr(home: Path, *args: str) -> dict:
    """Flower's own CLI with the connections in `home`/config.toml; its JSON reply."""
    return flwr_json(home, *args, timeout=120)


FOREIGN_CLIENTAPP = """
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(message, context):
    # What the probe did: read the institution's settings (and from there its data and keys).
    Path({marker!r}).write_text(str(context.node_config))
    return Message(RecordDict(), reply_to=message)
"""


def foreign_app(folder: Path, marker: Path) -> Path:
    """An app that names confide's ServerApp (so the coordinator runs a real job) but a
    ClientApp of its own, shipped as code in the app: it writes `marker` wherever it runs."""
    import tomli_w

    from confide.server.jobs import load_job

    (folder / "evil").mkdir(parents=True)
    (folder / "evil" / "__init__.py").write_text("")
    (folder / "evil" / "app.py").write_text(FOREIGN_CLIENTAPP.format(marker=str(marker)))
    job_file = folder.parent / "foreign-job.toml"
    job_file.write_text(JOB.replace('"digits-deployed"', '"foreign"'))
    job, _ = load_job(job_file)
    pyproject = {
        "project": {"name": "evil", "version": "1.0.0", "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "mallory",
                    "components": {
                        "serverapp": "confide.server.app:app",
                        "clientapp": "evil.app:app",
                    },
                    "config": {
                        "confide-job-name": "foreign",
                        "confide-job": job.job().model_dump_json(exclude_none=True),
                    },
                }
            }
        },
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return folder


def wait_finished(coordinator, run_id: str, seconds: float = 240) -> None:
    def finished() -> bool:
        listed = flwr(coordinator["state"] / "flwr", "ls", "confide", "--run-id", run_id)
        runs = listed.get("runs", [])
        return bool(runs) and str(runs[0]["status"]).startswith("finished")

    wait_until(finished, seconds=seconds, what=f"run {run_id} finished", pause=1)


def test_a_foreign_app_is_refused_at_the_control_api_and_by_every_institution(
    coordinator, federation, tmp_path
):
    marker = tmp_path / "foreign-code-ran"
    app = foreign_app(tmp_path / "app", marker)
    # With only the CA certificate (what every institution holds): the public port refuses.
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    (attacker / "config.toml").write_text(
        '[superlink]\ndefault = "target"\n\n[superlink.target]\n'
        f'address = "127.0.0.1:{coordinator["superlink"]}"\n'
        f'root-certificates = "{coordinator["state"] / "ca.pem"}"\n'
    )
    for args in (("run", str(app), "target"), ("ls", "target")):
        reply = flwr(attacker, *args)
        assert reply["success"] is False and "403" in reply["error-message"], reply
    listed = flwr(coordinator["state"] / "flwr", "ls", "confide")
    assert '"evil"' not in json.dumps(listed)  # no run was created
    # With the operator's own connection: the SuperLink starts it, no institution runs it.
    run_id = str(flwr(coordinator["state"] / "flwr", "run", str(app), "confide")["run-id"])
    wait_finished(coordinator, run_id)
    assert not marker.exists()
    for state in federation["states"]:
        refusals = [e for e in Ledger(state).entries() if e.kind == "refused-app"]
        assert [e.run for e in refusals] == [run_id]
    results = json.loads(
        (coordinator["state"] / "runs" / f"run-{run_id}" / "results.json").read_text()
    )
    assert "train-0 (its app check)" in results["stopped"]
    assert "train-1 (its app check)" in results["stopped"]
    reasons = [row["reason"] for row in results["rejected_updates"]]
    assert len(reasons) == 2 and all("evil/app.py" in reason for reason in reasons)
    assert not any(str(federation["root"]) in reason for reason in reasons)  # no local paths


def test_two_institutions_train_a_dp_job_and_its_results_are_written(
    coordinator, federation, tmp_path
):
    submitted = submit(coordinator, JOB, tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = submitted.stdout.split("as run ")[1].split(";")[0].strip()
    folder = coordinator["state"] / "runs" / f"run-{run_id}"
    results = json.loads((folder / "results.json").read_text())
    assert {path.name for path in folder.iterdir()} >= {
        "job.toml",
        "metrics.png",
        "epsilon.png",
        "privacy.json",
    }
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["institutions_trained"] == 2 for r in results["rounds"])
    assert results["rejected_updates"] == []
    assert results["final"]["accuracy"] > results["initial"]["accuracy"] + 0.2
    trained = {row["id"]: row for row in results["institutions"]}
    assert set(trained) == {"train-0", "train-1"}
    for row in trained.values():
        assert row["rounds_trained"] == 2 and row["accountant"] == "pld"
        assert 0 < row["epsilon"] <= 8.0 and row["delta"] == 1e-5
    assert "final accuracy" in submitted.stdout
    check_privacy_report(folder, results, run_id, federation["root"])
    check_registered_model(folder, results, federation["root"])
    # The app folder Flower packed holds the job's pyproject alone: no keys, no other code.
    (app_folder,) = [
        p
        for p in (coordinator["state"] / "jobs").iterdir()
        if p.name.startswith("digits-deployed-")
    ]
    assert [p.name for p in app_folder.iterdir()] == ["pyproject.toml"]
    status = server_cli("status", "--dir", str(coordinator["state"]), "--run", run_id)
    assert status.returncode == 0 and "finished" in status.stdout, status.stdout
    logs = server_cli("logs", run_id, "--dir", str(coordinator["state"]))
    assert "round 2: accuracy" in logs.stdout
    assert "\x1b[" not in logs.stdout  # not a terminal: no colour codes


def check_registered_model(folder: Path, results: dict, root: Path) -> None:
    """The run's model is registered as a version of digits-mlp (an earlier test's job may
    have registered one); its card names the institutions with the data commitments their
    own ledgers compute."""
    from confide.server.model_file import read_card

    card = read_card(folder / results["model"]["file"])
    assert card.registry is not None and card.registry.name == "digits-mlp"
    assert results["model"]["registered"] == f"digits-mlp:{card.registry.version}"
    assert card.weights.sha256 == results["model"]["sha256"] and card.run.kind == "deployment"
    for row in card.privacy.institutions:
        ledger = Ledger(root / str(row.id))
        fingerprint = next(e.fingerprint for e in ledger.entries() if e.kind == "spend")
        assert row.data_commitment == ledger.commitment(fingerprint)


def test_a_job_continues_a_registered_model_which_exports_and_scores_as_reported(
    coordinator, federation, tmp_path
):
    state = str(coordinator["state"])
    listed = server_cli("models", "list", "--dir", state, "--json")
    assert listed.returncode == 0, listed.stderr
    *_, first = [json.loads(line) for line in listed.stdout.splitlines()]
    assert first["card"]["run"]["name"] == "digits-deployed"  # the previous test's model
    name, version = first["version"].split(":")
    continued = f"{name}:{int(version) + 1}"
    # One round with much noise: the institutions' max_epsilon (10) leaves little after the
    # previous job's ~9.4, and their ledgers keep counting from there.
    job = (
        JOB.replace('"digits-deployed"', '"digits-continued"')
        .replace("rounds = 2", "rounds = 1")
        .replace("target_epsilon = 8.0", "noise_multiplier = 4.0")
    )
    submitted = submit(coordinator, job + f'[model]\ninit = "{first["version"]}"\n', tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = submitted.stdout.split("as run ")[1].split(";")[0].strip()
    results = json.loads(
        (coordinator["state"] / "runs" / f"run-{run_id}" / "results.json").read_text()
    )
    # It started from that version (its initial test accuracy is that version's final one)
    # and is registered as the next, which names it in its lineage.
    assert results["initial"]["accuracy"] == first["card"]["metrics"]["accuracy"]
    assert results["model"]["registered"] == continued
    exported = server_cli(
        "models", "export", continued, "--dir", state, "--out", str(tmp_path / "m")
    )
    assert exported.returncode == 0, exported.stderr
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert [(a["source"], a["sha256"]) for a in card["lineage"]] == [
        (first["version"], first["sha256"])
    ]
    scored = cli("confide-simulate", "predict", str(tmp_path / "m" / "model.safetensors"))
    assert scored.returncode == 0, scored.stderr
    assert f"{results['final']['accuracy']:.6f}" in scored.stdout
    # The institutions' ledgers kept counting: three rounds, and a larger epsilon.
    before = {row["id"]: row for row in first["card"]["privacy"]["institutions"]}
    for row in card["privacy"]["institutions"]:
        spends = [e for e in Ledger(federation["root"] / row["id"]).entries() if e.kind == "spend"]
        assert len(spends) == 3
        assert row["dataset_epsilon"] > before[row["id"]]["dataset_epsilon"]


def test_a_job_the_institutions_limits_refuse_says_so_in_its_summary_and_exit_code(
    coordinator, federation, tmp_path
):
    # sigma 0.3 spends far more than either institution's max_epsilon (10) in one round.
    job = JOB.replace('"digits-deployed"', '"too-costly"').replace(
        "target_epsilon = 8.0", "noise_multiplier = 0.3"
    )
    submitted = submit(coordinator, job, tmp_path)
    assert submitted.returncode == 3, submitted.stdout + submitted.stderr
    assert "train-0 refused" in submitted.stdout and "train-1 refused" in submitted.stdout
    assert "stopped early" in submitted.stdout and "its privacy limits" in submitted.stdout
    # Each institution counts its own refusal too (a 'refused-round' entry in its ledger, once
    # for the job), on its /metrics.
    round_refusals = ("confide_client_refusals_total", frozenset({("reason", "round")}))
    for folder, port in zip(federation["states"], federation["metrics"], strict=True):
        assert scrape(port)[round_refusals] == 1, folder
        entries = Ledger(folder).entries(read_only=True)
        assert sum(e.kind == "refused-round" for e in entries) == 1, folder


def test_a_job_needing_more_institutions_than_are_online_is_refused_with_the_numbers(
    coordinator, federation, tmp_path
):
    job = JOB.replace("min_available = 2", "min_available = 3")
    refused = submit(coordinator, job, tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "needs 3 institutions online" in refused.stderr and "2 are" in refused.stderr
    waited = submit(coordinator, job, tmp_path, "--wait", "3")
    assert waited.returncode == 2 and "waiting for institutions: 2 of 3 online" in waited.stderr


def signed_headers(state: Path) -> dict[str, str]:
    """What Flower's SuperNode sends to prove it holds the institution's key (a fresh
    signature of the current time)."""
    from base64 import b64encode

    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    key = serialization.load_ssh_private_key((state / "institution.key").read_bytes(), None)
    timestamp = now().isoformat()
    return {
        FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(public_key_to_bytes(key.public_key())).decode(),
        TIMESTAMP_HEADER: timestamp,
        FLEET_HTTP_SIGNATURE_HEADER: b64encode(
            sign_message(key, timestamp.encode("ascii"))
        ).decode(),
        "content-type": "application/protobuf",
    }


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics on 127.0.0.1:`port` over HTTP: (sample name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_show_the_federation_the_coordinator_and_each_institution_see(
    coordinator, federation
):
    """After the jobs above (a foreign app refused, a DP job, a continued one, one the
    institutions' limits refused): /metrics of `confide-server start` and of each
    `confide-client start`, scraped as Prometheus does."""
    from confide.client.budget import budget
    from confide.server.institutions import list_institutions
    from confide.server.settings import StateDir
    from confide.server.state import open_database

    state = coordinator["state"]
    assert f"127.0.0.1:{coordinator['metrics']}/metrics" in coordinator["started"].output
    # The SuperLink is asked in the background: the first scrape may come before its answer.
    up = ("confide_superlink_up", frozenset())
    wait_until(
        lambda: scrape(coordinator["metrics"])[up] == 1, seconds=90, what="the SuperLink's answer"
    )
    server = scrape(coordinator["metrics"])
    directory = StateDir(state)
    engine = open_database(directory.database_url(directory.load_settings()))
    try:
        rows = list_institutions(engine, None)
    finally:
        engine.dispose()
    revoked = sum(row.revoked_at is not None for row in rows)
    assert server[("confide_institutions_revoked", frozenset())] == revoked >= 1
    assert server[("confide_institutions_enrolled", frozenset())] == len(rows) - revoked
    assert server[up] == 1
    assert 0 <= server[("confide_superlink_last_answer_age_seconds", frozenset())] < 90
    for name in ("train-0", "train-1"):
        assert server[("confide_institution_online", frozenset({("institution", name)}))] == 1
    assert server[("confide_institutions_online", frozenset())] >= 2
    finished = server[("confide_runs", frozenset({("state", "finished:completed")}))]
    assert finished >= 3
    # The DP job's figures are its results.json's.
    for folder in (state / "runs").iterdir():
        results = json.loads((folder / "results.json").read_text())
        run = folder.name.removeprefix("run-")
        if results["scenario"] == "too-costly":
            refused = ("confide_replies_refused_total", frozenset(
                {("run", run), ("phase", "train"), ("reason", "institution")}
            ))  # fmt: skip
            assert server[refused] == len(results["rejected_updates"]) >= 2
        if results["scenario"] != "digits-deployed":
            continue
        assert server[("confide_run_rounds_completed", frozenset({("run", run)}))] == 2
        count = ("confide_round_duration_seconds_count", frozenset({("run", run)}))
        assert server[count] == 2
        assert server[("confide_updates_accepted_total", frozenset({("run", run)}))] == 4
        assert server[("confide_run_delta", frozenset({("run", run)}))] == 1e-5
        for row in results["institutions"]:
            labels = frozenset({("institution", row["id"]), ("run", run)})
            named = labels | {("accountant", row["accountant"])}
            assert server[("confide_institution_epsilon", named)] == row["epsilon"]
            assert server[("confide_institution_dataset_delta", labels)] == row["dataset_delta"]
            assert server[("confide_institution_rounds_trained_total", labels)] == 2
    # Each institution's own: its ledger as `confide-client budget` reads it.
    for folder, port, started in zip(
        federation["states"], federation["metrics"], federation["started"], strict=True
    ):
        assert f"127.0.0.1:{port}/metrics" in started.output
        own = scrape(port)
        (line,) = budget(folder)
        dataset = frozenset({("dataset", "default")})
        assert own[("confide_client_ledger_verified", frozenset())] == 1
        spent = dataset | {("accountant", line.accountant)}
        assert own[("confide_client_epsilon_spent", spent)] == line.epsilon
        assert own[("confide_client_epsilon_remaining", dataset)] == line.remaining
        assert own[("confide_client_rounds_trained_total", dataset)] == line.rounds == 3
        assert own[("confide_client_refusals_total", frozenset({("reason", "app")}))] == 1
        assert own[("confide_client_refusals_total", frozenset({("reason", "round")}))] == 1


def test_every_control_and_runtime_method_is_refused_to_institutions_enrolled_or_revoked(
    coordinator, federation, data_file, tmp_path
):
    import httpx
    from fastapi.routing import iter_route_contexts
    from flwr.supercore.routers.runtime import create_runtime_router, responses_router
    from flwr.superlink.routers.control.router import router as control

    revoked = tmp_path / "hospital-revoked"
    join(coordinator, data_file, revoked, "hospital-revoked")
    gone = server_cli(
        "institutions", "revoke", "hospital-revoked", "--dir", str(coordinator["state"])
    )
    assert gone.returncode == 0, gone.stderr
    routes = [
        (method, context.path)
        for router in (control, create_runtime_router("SuperLink"), responses_router)
        for context in iter_route_contexts(router.routes)
        for method in context.methods or []
    ]
    assert ("POST", "/v1/control/start-run") in routes and len(routes) > 40
    verify = ssl.create_default_context(cafile=str(coordinator["state"] / "ca.pem"))
    base = f"https://127.0.0.1:{coordinator['superlink']}"
    with httpx.Client(verify=verify, timeout=20) as client:
        for who, state in (("enrolled", federation["states"][0]), ("revoked", revoked)):
            for method, path in routes:
                answer = client.request(
                    method, base + path, content=b"", headers=signed_headers(state)
                )
                assert answer.status_code == 403, (who, method, path, answer.status_code)
        # The same signed request reaches the Fleet API (it answers, not the front's 403).
        fleet = client.post(
            base + "/v1/fleet/get-run", content=b"", headers=signed_headers(federation["states"][0])
        )
        assert fleet.status_code != 403


def test_a_plaintext_client_is_refused_by_both_services(coordinator):
    token = new_token(coordinator["state"], "hospital-plain")
    channel = grpc.insecure_channel(f"127.0.0.1:{coordinator['enrollment']}")
    request = enrollment_pb2.RegisterRequest(token=token, public_key_openssh=b"x")
    with pytest.raises(grpc.RpcError) as refused:
        enrollment_pb2_grpc.EnrollmentStub(channel).Register(request, timeout=20)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # The SuperLink speaks HTTPS only: a plaintext server would answer any HTTP request with
    # a status line (404 included); a TLS server closes or sends a TLS alert.
    with socket.create_connection(("127.0.0.1", coordinator["superlink"]), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(10)
        try:
            reply = raw.recv(200)
        except (TimeoutError, ConnectionResetError):
            reply = b""
    assert not reply.startswith(b"HTTP/")


def test_an_unregistered_key_is_refused_by_the_superlink(coordinator, tmp_path):
    private = tmp_path / "stranger"
    private.write_bytes(openssh_key()[0])
    private.chmod(0o600)
    before = supernodes(coordinator)
    stranger = Started(
        [
            str(BIN / "flower-supernode"),
            "--root-certificates", str(coordinator["state"] / "ca.pem"),
            "--superlink", f"127.0.0.1:{coordinator['superlink']}",
            "--auth-supernode-private-key", str(private),
            "--port", str(free_port()),
        ],
        flower_environment(),  # it starts Flower's SuperExec by name
    )  # fmt: skip
    try:
        stranger.wait_for("2004", 60)  # refused: it exits, or is killed once it said so
    finally:
        stranger.finish(signal.SIGKILL)
    assert "SuperNode ID" not in stranger.output, stranger.output
    assert supernodes(coordinator) == before


def audit_copy(coordinator, folder: Path) -> Path:
    """The coordinator's audit log and the files that state it, copied to `folder`."""
    import shutil

    folder.mkdir()
    for name in ("settings.toml", "confide.db", "audit.key", "audit.head"):
        shutil.copy2(coordinator["state"] / name, folder / name)
    return folder


def test_the_audit_log_records_each_action_in_order_and_detects_tampering(coordinator, tmp_path):
    import sqlite3

    listed = server_cli("audit", "--dir", str(coordinator["state"]), "--json")
    assert listed.returncode == 0, listed.stderr
    entries = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    actions = [(entry["action"], entry["details"]) for entry in entries]
    # The module's tests, in the order they ran (each a subsequence of the whole log).
    expected = [
        ("service.started", None),
        ("token.created", "hospital-a"),
        ("token.redeemed", "hospital-a"),
        ("institution.registered", "hospital-a"),
        ("institution.revoked", "hospital-e"),
        ("round.refused", "train-0"),
        ("run.stopped", "foreign"),
        ("job.submitted", "digits-deployed"),
        ("run.finished", "digits-deployed"),
        ("job.submitted", "too-costly"),
        ("round.refused", "train-1"),
        ("run.stopped", "too-costly"),
        ("institution.revoked", "hospital-revoked"),
    ]
    position = 0
    for action, detail in expected:
        while position < len(actions) and not (
            actions[position][0] == action
            and (
                detail is None
                or detail in json.dumps(actions[position][1])
                or detail in entries[position]["actor"]
            )
        ):
            position += 1
        assert position < len(actions), f"{action} {detail} missing or out of order"
        position += 1
    assert not any("secret" in json.dumps(entry).lower() for entry in entries)
    table = server_cli("audit", "--dir", str(coordinator["state"]))  # redirected: plain text
    assert table.returncode == 0 and "service.started" in table.stdout
    assert "\x1b[" not in table.stdout
    intact = server_cli("audit", "verify", "--dir", str(audit_copy(coordinator, tmp_path / "a")))
    assert intact.returncode == 0 and "intact" in intact.stdout, intact.stdout + intact.stderr
    tampering = {
        "edited": "UPDATE audit_log SET actor = 'someone-else' WHERE seq = 3",
        "deleted": "DELETE FROM audit_log WHERE seq = 4",
        "reordered": "UPDATE audit_log SET seq = -1 WHERE seq = 2; "
        "UPDATE audit_log SET seq = 2 WHERE seq = 3; UPDATE audit_log SET seq = 3 WHERE seq = -1",
        "truncated": f"DELETE FROM audit_log WHERE seq = {len(entries)}",
    }
    for name, statement in tampering.items():
        copy = audit_copy(coordinator, tmp_path / name)
        with sqlite3.connect(copy / "confide.db") as database:
            database.executescript(statement)
        checked = server_cli("audit", "verify", "--dir", str(copy))
        assert checked.returncode == 2, (name, checked.stdout, checked.stderr)
