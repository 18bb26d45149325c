"""The institution's /metrics: its ledger as `confide-client budget` reads it (read only:
a scrape writes nothing in the folder), refusals it recorded, nothing once the ledger fails
verification; and where `start` serves it (institution.toml's port unless an option says
otherwise)."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
from helpers import free_port
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from confide.client.budget import budget
from confide.client.institution import InstitutionConfig, InstitutionDir
from confide.client.metrics import METRICS, InstitutionCollector
from confide.privacy.ledger import Ledger, Spend
from confide.privacy.policy import PrivacyPolicy


def spend(run: str, server_round: int, *, dataset: str = "default", sigma: float = 1.1) -> Spend:
    return Spend(dataset, "sha256:x", "job", run, server_round, 300, 0.2, sigma, 5, 1e-5, "rdp")


@pytest.fixture
def trained(institution: Path) -> Path:
    """The institution (limit epsilon 10 at delta 1e-6) after 3 rounds in 2 jobs on its
    dataset and 1 on another, and one run's app refused."""
    directory = InstitutionDir(institution)
    config = directory.load()
    policy = PrivacyPolicy(max_epsilon=10.0, max_delta=1e-6)
    directory.save(config.model_copy(update={"privacy": policy}))
    ledger = Ledger(institution).open()
    for run, server_round in (("1", 1), ("1", 2), ("2", 1)):
        ledger.record(spend(run, server_round))
    ledger.record(spend("3", 1, dataset="survey"))
    ledger.record_refusal(run="4", fab_hash="ab" * 32, reason="not confide's ClientApp")
    return institution


def scrape(collector: InstitutionCollector) -> dict[str, list[Sample]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def by_dataset(samples: dict[str, list[Sample]], name: str) -> dict[str, float]:
    return {s.labels["dataset"]: s.value for s in samples[name]}


def test_the_budget_per_dataset_is_the_one_confide_client_budget_shows(trained: Path):
    samples = scrape(InstitutionCollector(trained))
    lines = {line.dataset: line for line in budget(trained)}
    assert value_of(samples, "confide_client_ledger_verified") == 1
    spent = by_dataset(samples, "confide_client_epsilon_spent")
    assert spent == pytest.approx({name: line.epsilon for name, line in lines.items()})
    # The epsilon names its accountant (the institution's: RDP by default).
    assert {s.labels["accountant"] for s in samples["confide_client_epsilon_spent"]} == {"rdp"}
    assert by_dataset(samples, "confide_client_epsilon_remaining") == pytest.approx(
        {name: 10.0 - line.epsilon for name, line in lines.items()}
    )
    assert by_dataset(samples, "confide_client_epsilon_limit") == {"default": 10, "survey": 10}
    assert by_dataset(samples, "confide_client_delta") == {"default": 1e-6, "survey": 1e-6}
    rounds = by_dataset(samples, "confide_client_rounds_trained_total")
    assert rounds == {"default": 3, "survey": 1}
    assert by_dataset(samples, "confide_client_jobs_trained") == {"default": 2, "survey": 1}
    refusals = {s.labels["reason"]: s.value for s in samples["confide_client_refusals_total"]}
    assert refusals == {"app": 1, "round": 0}  # every reason, counted or not


def value_of(samples: dict[str, list[Sample]], name: str) -> float:
    (sample,) = samples[name]
    return float(sample.value)


def test_a_new_round_shows_at_the_next_scrape(trained: Path):
    collector = InstitutionCollector(trained)
    before = by_dataset(scrape(collector), "confide_client_epsilon_spent")["default"]
    Ledger(trained).record(spend("2", 2))
    after = scrape(collector)
    assert by_dataset(after, "confide_client_rounds_trained_total")["default"] == 4
    assert by_dataset(after, "confide_client_epsilon_spent")["default"] > before


def test_training_without_dp_spends_an_unbounded_epsilon(trained: Path):
    Ledger(trained).record(spend("5", 1, sigma=0.0))
    samples = scrape(InstitutionCollector(trained))
    assert math.isinf(by_dataset(samples, "confide_client_epsilon_spent")["default"])
    assert by_dataset(samples, "confide_client_epsilon_remaining")["default"] == 0


def test_a_tampered_ledger_shows_as_unverified_and_no_spend(trained: Path):
    collector = InstitutionCollector(trained)
    assert "confide_client_epsilon_spent" in scrape(collector)
    with sqlite3.connect(trained / "ledger.sqlite") as connection:
        connection.execute("DELETE FROM entries WHERE seq = 2")
    samples = scrape(collector)
    assert value_of(samples, "confide_client_ledger_verified") == 0
    assert set(samples) == {"confide_client_ledger_verified"}


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }


def test_an_institution_that_never_trained_shows_its_whole_budget_and_gets_no_ledger(
    institution: Path,
):
    before = folder_state(institution)
    samples = scrape(InstitutionCollector(institution))
    assert by_dataset(samples, "confide_client_epsilon_spent") == {"default": 0.0}
    limit = InstitutionDir(institution).load().privacy.max_epsilon
    assert by_dataset(samples, "confide_client_epsilon_remaining") == {"default": limit}
    assert value_of(samples, "confide_client_ledger_verified") == 1
    # A scrape is read only: no ledger, key or mark was created.
    assert folder_state(institution) == before


def test_a_scrape_writes_nothing_in_a_folder_that_trained(trained: Path):
    before = folder_state(trained)
    scrape(InstitutionCollector(trained))
    assert folder_state(trained) == before


def test_every_exported_metric_is_listed_with_its_type_and_documented(trained: Path):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(InstitutionCollector(trained))
    families = text_string_to_metric_families(generate_latest(registry).decode())
    exported = {f.name + ("_total" if f.type == "counter" else ""): f.type for f in families}
    assert exported == METRICS
    guide = (Path(__file__).resolve().parents[3] / "docs" / "deployment.md").read_text()
    for name in METRICS:
        assert f"`{name}`" in guide, name


def test_start_refuses_a_taken_metrics_port_with_exit_code_2_and_writes_nothing(
    institution: Path,
):
    import socket

    from typer.testing import CliRunner

    from confide.client.cli import app
    from confide.client.runner import SECRET_FILE

    directory = InstitutionDir(institution)
    directory.save(directory.load().model_copy(update={"port": free_port()}))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(
            app, ["start", "--dir", str(institution), "--metrics-port", str(port)]
        )
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"port {port} for the institution's metrics (127.0.0.1:{port})" in said
    assert not (institution / SECRET_FILE).exists() and not (institution / "logs").exists()


def test_start_serves_metrics_where_institution_toml_says_unless_an_option_says_otherwise(
    institution: Path, monkeypatch: pytest.MonkeyPatch
):
    """`join` saves the port (tests/cli/test_client_join.py); a later `start` without the
    option serves there: a second institution on the host keeps its own port."""
    import socket

    from typer.testing import CliRunner

    from confide.client.cli import app
    from confide.client.supernode import metrics_endpoint

    # An institution.toml from before the metrics settings still reads (extra keys are
    # refused, missing ones with a default are not), with their defaults.
    settings = institution / "institution.toml"
    lines = settings.read_text().splitlines()
    settings.write_text("\n".join(x for x in lines if not x.startswith("metrics_")) + "\n")
    assert "metrics_port" not in settings.read_text().replace(str(institution.parent), "")
    config = InstitutionDir(institution).load()
    assert (config.metrics_port, config.metrics_address) == (9465, "127.0.0.1")
    with pytest.raises(ValueError):
        InstitutionConfig.model_validate(config.model_dump() | {"metrics_port": 65536})

    directory = InstitutionDir(institution)
    monkeypatch.delenv("CONFIDE_METRICS_PORT", raising=False)  # tests/conftest.py sets 0
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        saved = config.model_copy(update={"port": free_port(), "metrics_port": port})
        directory.save(saved)
        assert metrics_endpoint(saved).port == port
        assert metrics_endpoint(saved, port=0, address="::1") == metrics_endpoint(
            saved.model_copy(update={"metrics_port": 0, "metrics_address": "::1"})
        )
        result = CliRunner().invoke(app, ["start", "--dir", str(institution)])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"port {port} for the institution's metrics (127.0.0.1:{port})" in said
    assert "metrics_port in institution.toml" in said
