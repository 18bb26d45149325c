"""`join`'s continuity decisions and the host's index, on real ledgers and a real index file
(the CLI runs of the same live in tests/cli/test_client_budget_continuity.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confide.client.continuity import (
    ContinuityError,
    index_institution_ledger,
    plan_ledger,
)
from confide.client.institution import InstitutionConfig, InstitutionDir
from confide.privacy.accounting import epsilon
from confide.privacy.ledger import KEY, Ledger, Spend
from confide.privacy.ledger_index import LedgerIndex
from confide.privacy.policy import PrivacyPolicy

FINGERPRINT = "sha256:" + "ab" * 32


def institution(folder: Path, accountant: str | None = None, rounds: int = 3) -> Path:
    """An institution's folder (institution.toml, `accountant` if given) whose ledger spent
    `rounds` rounds on FINGERPRINT, indexed as `join` indexes it."""
    policy = PrivacyPolicy() if accountant is None else PrivacyPolicy(accountant=accountant)
    config = InstitutionConfig(
        name=folder.name,
        node_id=7,
        superlink="127.0.0.1:1",
        enrollment="127.0.0.1:2",
        data=folder / "data.csv",
        privacy=policy,
        declared_examples=100,
    )
    folder.mkdir()
    InstitutionDir(folder).save(config)
    ledger = Ledger(folder).open()
    for server_round in range(1, rounds + 1):
        ledger.record(Spend("default", FINGERPRINT, "j", "1", server_round, 90, 0.3, 0.9, 30,
                            1e-5, "rdp"))  # fmt: skip
    LedgerIndex().add(FINGERPRINT, folder)
    return folder


def refusal(tmp_path: Path, **options: object) -> str:
    with pytest.raises(ContinuityError) as refused:
        plan_ledger(state=tmp_path / "new", data=tmp_path / "data.csv", fingerprint=FINGERPRINT,
                    dataset="default", delta=1e-5, **options)  # fmt: skip
    return str(refused.value)


@pytest.mark.parametrize("accountant", [None, "rdp", "pld"])
def test_a_refusal_states_the_spend_with_the_folders_own_accountant(
    tmp_path: Path, accountant: str | None
) -> None:
    """`None`: a folder whose institution.toml cannot be read (RDP, saying so)."""
    folder = institution(tmp_path / "hospital-a", accountant)
    if accountant is None:
        InstitutionDir(folder).settings_file.write_text("not = [toml")
    history = [(0.9, 0.3, 30)] * 3
    chosen = accountant or "rdp"
    spent = epsilon(history, 1e-5, chosen)
    assert spent != pytest.approx(epsilon(history, 1e-5, "pld" if chosen == "rdp" else "rdp"))
    source = "as its institution.toml sets" if accountant else "the default: no readable"
    assert (
        f"{folder}: epsilon {spent:.3f} spent at delta 1e-05 ({chosen.upper()} accountant, "
        f"{source}" in refusal(tmp_path)
    )


def test_checking_other_folders_changes_none_of_them(tmp_path: Path) -> None:
    """A folder whose ledger creation was cut short (its key still staged) is read as an
    empty ledger and left as it is; it used to be repaired by the check."""
    other = institution(tmp_path / "hospital-a", rounds=0)
    Ledger(other).key_path.rename(other / f".{KEY}.new")
    before = sorted(path.name for path in other.iterdir())
    plan = plan_ledger(state=tmp_path / "new", data=tmp_path / "data.csv",
                       fingerprint=FINGERPRINT, dataset="default", delta=1e-5)  # fmt: skip
    assert plan.source is None and plan.reason is None
    assert sorted(path.name for path in other.iterdir()) == before


def test_a_moved_ledger_is_not_continued_again(tmp_path: Path) -> None:
    folder = institution(tmp_path / "hospital-a")
    moved = institution(tmp_path / "hospital-b")  # holds the ledger that continues it
    Ledger(folder).note("moved", json.dumps({"to": str(moved)}))
    message = refusal(tmp_path, ledger_from=folder)
    assert f"was moved to {moved}" in message
    assert f"--ledger-from {moved}" in message


def test_a_moved_ledger_whose_destination_lost_its_ledger_can_be_continued(tmp_path: Path):
    """Else the only way out would be a new budget: the reset the continuity is there for."""
    folder = institution(tmp_path / "hospital-a")
    Ledger(folder).note("moved", json.dumps({"to": str(tmp_path / "lost")}))
    plan = plan_ledger(state=tmp_path / "new", data=tmp_path / "data.csv",
                       fingerprint=FINGERPRINT, dataset="default", delta=1e-5,
                       ledger_from=folder)  # fmt: skip
    assert plan.source == folder


def test_only_institution_folders_are_indexed(tmp_path: Path, ledger_index: Path) -> None:
    simulated = tmp_path / "state" / "institution-0"
    Ledger(simulated).open()
    assert index_institution_ledger(simulated, [FINGERPRINT]) is None
    assert not ledger_index.exists()
    folder = institution(tmp_path / "hospital-a", rounds=0)
    ledger_index.unlink()
    assert index_institution_ledger(folder, [FINGERPRINT, FINGERPRINT]) is None
    assert index_institution_ledger(folder, [FINGERPRINT]) is None
    assert LedgerIndex(ledger_index).folders(FINGERPRINT) == [folder.resolve()]


def test_an_index_that_cannot_be_written_is_a_warning(tmp_path: Path, ledger_index: Path):
    folder = institution(tmp_path / "hospital-a", rounds=0)
    ledger_index.unlink()
    ledger_index.mkdir()  # the index's path is a folder: writing it fails
    warning = index_institution_ledger(folder, ["sha256:other"])
    assert warning is not None and str(ledger_index) in warning
