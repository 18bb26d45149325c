"""A deployed institution's ClientApp: its own settings, its own file, its own limits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from confide.client.app import build_client_app
from confide.client.data import STATE_DIR_KEY, deployed_institution
from confide.client.institution import InstitutionConfig, InstitutionDir
from confide.privacy.accounting import epsilon
from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.privacy.instructions import RoundInstructions
from confide.privacy.ledger import Ledger, fingerprint_file
from confide.privacy.mechanism import sampling
from confide.privacy.policy import LEDGER_UNUSABLE, REFUSED_BY_POLICY, PrivacyPolicy
from confide.tasks.config import TaskConfig
from confide.tasks.datasets import DatasetError, load_digits
from confide.tasks.registry import get_task

pytestmark = pytest.mark.usefixtures("inside_a_run")
LABELS = [str(k) for k in range(10)]
# The institution's file holds 120 examples (108 for training); it publishes 100.
DECLARED = 100


@pytest.fixture
def institution(tmp_path: Path):
    """An institution directory whose CSV holds 120 digits without any 9."""

    def make(policy: PrivacyPolicy = PrivacyPolicy(), declared: int | None = DECLARED) -> Context:
        digits = load_digits()
        keep = np.flatnonzero(digits.y != 9)[:120]
        lines = [",".join([*(f"p{j}" for j in range(64)), "digit"])]
        lines += [",".join([*(f"{v:.4f}" for v in digits.x[i]), str(digits.y[i])]) for i in keep]
        data = tmp_path / "local.csv"
        data.write_text("\n".join(lines) + "\n")
        config = InstitutionConfig(
            name="hospital-x",
            node_id=7,
            superlink="127.0.0.1:1",
            enrollment="127.0.0.1:2",
            data=data,
            label_column="digit",
            device="cpu",
            privacy=policy,
            declared_examples=declared,
        )
        InstitutionDir(tmp_path).save(config)
        return Context(
            run_id=1,
            node_id=7,
            node_config={STATE_DIR_KEY: str(tmp_path)},
            state=RecordDict(),
            run_config={},
        )

    return make


def _instructions(**privacy: object) -> RoundInstructions:
    return RoundInstructions(
        task=TaskConfig(name="digits"),
        train=TrainConfig(batch_size=20, lr=0.5),
        privacy=PrivacyConfig(**({"noise_multiplier": 1.0} | privacy)),
        rounds=3,
        features=64,
        labels=LABELS,
    )


def _train_message(instructions: RoundInstructions, server_round: int = 1) -> Message:
    model = get_task("digits").build_model(instructions.task, shape=(64,), classes=10, seed=0)
    config = ConfigRecord(instructions.to_config() | {"server-round": server_round})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def test_the_institution_is_read_from_its_own_state_directory(institution):
    context = institution()
    me = deployed_institution(context)
    assert (me.name, me.device, me.policy) == ("hospital-x", "cpu", PrivacyPolicy())
    local = me.load(_instructions())
    assert len(local.train) + len(local.validation) == 120
    assert local.train.classes == 10  # the job's classes, although this file has no 9


def test_a_file_with_other_columns_than_the_model_is_refused(institution):
    me = deployed_institution(institution())
    with pytest.raises(DatasetError, match="64 feature columns, the job's model takes 30"):
        me.load(_instructions().model_copy(update={"features": 30}))


def test_a_node_without_a_state_directory_is_told_how_to_start(institution):
    from confide.client.institution import InstitutionError

    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(InstitutionError, match="confide-client start"):
        deployed_institution(context)


def test_train_replies_with_weights_and_the_rounds_privacy_spend(institution):
    context = institution()
    reply = build_client_app()(_train_message(_instructions()), context)
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    assert 0 < metrics["epsilon"] < 10
    # The weight is the declared size: the 108 training examples never leave.
    assert metrics["num-examples"] == DECLARED
    assert metrics["sample-rate"] == sampling(DECLARED, 20)[0]
    assert reply.content["identity"]["institution"] == "hospital-x"
    assert reply.content["mechanism"]["noise-generator"] == "os-csprng"  # the default


def test_the_torch_generator_is_reported_when_the_institution_chooses_it(institution, tmp_path):
    context = institution()
    directory = InstitutionDir(tmp_path)
    directory.save(directory.load().model_copy(update={"noise_generator": "torch"}))
    reply = build_client_app()(_train_message(_instructions()), context)
    assert reply.content["mechanism"]["noise-generator"] == "torch-os-seeded"


def test_an_institution_without_a_declared_size_refuses_to_train(institution):
    context = institution(declared=None)
    reply = build_client_app()(_train_message(_instructions()), context)
    assert reply.has_error() and reply.error.code == REFUSED_BY_POLICY
    assert "declares no size" in reply.error.reason and "declared_examples" in reply.error.reason
    assert Ledger(Path(context.node_config[STATE_DIR_KEY])).entries() == []


def test_a_deployed_institution_refuses_a_delta_not_below_one_over_its_declared_size(
    institution,
):
    # Its own max_delta would allow 0.02; 1/N = 0.01 does not.
    context = institution(PrivacyPolicy(max_delta=0.05))
    reply = build_client_app()(_train_message(_instructions(delta=0.02)), context)
    assert reply.has_error() and reply.error.code == REFUSED_BY_POLICY
    assert "delta = 0.02 is not below 1/N = 0.01" in reply.error.reason
    assert Ledger(Path(context.node_config[STATE_DIR_KEY])).entries() == []


def test_a_round_past_the_institutions_limit_is_refused_not_trained(institution):
    context = institution(PrivacyPolicy(max_epsilon=0.5))
    reply = build_client_app()(_train_message(_instructions()), context)
    assert reply.has_error()
    assert reply.error.code == REFUSED_BY_POLICY
    assert "hospital-x refuses round 1" in reply.error.reason
    assert "max_epsilon 0.5" in reply.error.reason
    assert "confide.privacy.history" not in context.state  # nothing spent
    assert Ledger(Path(context.node_config[STATE_DIR_KEY])).entries() == []


def test_the_coordinator_cannot_turn_dp_off_at_an_institution_that_requires_it(institution):
    reply = build_client_app()(_train_message(_instructions(enabled=False)), institution())
    assert reply.has_error() and "requires DP-SGD" in reply.error.reason


def test_the_validation_cut_is_kept_for_the_job_and_redone_when_the_file_changes(institution):
    from confide.client.data import SPLIT_KEY

    context = institution()
    first = deployed_institution(context).load(_instructions())
    assert SPLIT_KEY in context.state
    again = deployed_institution(context).load(_instructions())
    assert np.array_equal(first.validation.x, again.validation.x)
    assert np.array_equal(first.train.y, again.train.y)
    key = context.state[SPLIT_KEY]["key"]
    data = InstitutionDir(Path(context.node_config[STATE_DIR_KEY])).load().data
    data.write_text("\n".join(data.read_text().splitlines()[:61]) + "\n")  # 60 examples now
    shorter = deployed_institution(context).load(_instructions())
    assert len(shorter.train) + len(shorter.validation) == 60
    assert context.state[SPLIT_KEY]["key"] != key


def _context(context: Context, run_id: int) -> Context:
    """The same node in another run (or restarted): the same settings, an empty state."""
    return Context(
        run_id=run_id, node_id=7, node_config=dict(context.node_config), state=RecordDict(),
        run_config={},
    )  # fmt: skip


def test_a_restarted_supernode_continues_the_runs_spend_from_the_ledger(institution):
    context = institution()
    app = build_client_app()
    first = app(_train_message(_instructions(), 1), context).content["metrics"]["epsilon"]
    second = app(_train_message(_instructions(), 2), _context(context, 1)).content["metrics"]
    assert second["epsilon"] > first  # counted on from round 1, not from zero
    rate, steps = sampling(DECLARED, 20)
    assert second["epsilon"] == pytest.approx(epsilon([(1.0, rate, 2 * steps)], 1e-5))


def test_a_second_job_starts_from_the_first_jobs_spend(institution):
    context = institution()
    app = build_client_app()
    for server_round in (1, 2):
        app(_train_message(_instructions(), server_round), context)
    metrics = app(_train_message(_instructions(), 1), _context(context, 2)).content["metrics"]
    rate, steps = sampling(DECLARED, 20)
    per_round = (1.0, rate, steps)
    assert metrics["epsilon"] == pytest.approx(epsilon([per_round], 1e-5))  # this job only
    assert metrics["dataset-epsilon"] == pytest.approx(epsilon([per_round] * 3, 1e-5))
    assert metrics["dataset-delta"] == 1e-5
    ledger = Ledger(Path(context.node_config[STATE_DIR_KEY]))
    assert [(e.run, e.round) for e in ledger.entries()] == [("1", 1), ("1", 2), ("2", 1)]
    assert {e.fingerprint for e in ledger.entries()} == {
        fingerprint_file(InstitutionDir(ledger.root).load().data)
    }


def test_the_limit_stops_training_at_the_round_that_would_cross_it(institution):
    rate, steps = sampling(DECLARED, 20)
    spent = [epsilon([(1.0, rate, steps)] * k, 1e-5) for k in range(1, 8)]
    limit = (spent[4] + spent[5]) / 2  # five rounds fit, the sixth would not
    context = institution(PrivacyPolicy(max_epsilon=limit))
    app = build_client_app()
    trained = []
    for run_id, server_round in [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1)]:
        reply = app(_train_message(_instructions(), server_round), _context(context, run_id))
        trained.append(not reply.has_error())
        if reply.has_error():
            assert reply.error.code == REFUSED_BY_POLICY
            assert f"to {spent[5]:.3f}" in reply.error.reason
    assert trained == [True] * 5 + [False, False]
    assert len(Ledger(Path(context.node_config[STATE_DIR_KEY])).entries()) == 5


def test_a_tampered_ledger_stops_training_until_an_operator_reseals_it(institution):
    import sqlite3

    context = institution()
    app = build_client_app()
    app(_train_message(_instructions(), 1), context)
    ledger = Ledger(Path(context.node_config[STATE_DIR_KEY]))
    with sqlite3.connect(ledger.path) as connection:
        connection.execute("UPDATE entries SET noise_multiplier = 50.0")
    reply = app(_train_message(_instructions(), 2), context)
    assert reply.has_error() and reply.error.code == LEDGER_UNUSABLE
    assert "confide-client budget verify" in reply.error.reason
    ledger.reseal("test: accepted the edited row")
    assert not app(_train_message(_instructions(), 2), context).has_error()


def test_a_pld_job_calibrates_and_reports_with_pld_and_the_ledger_states_the_institutions_pld(
    institution,
):
    from confide.privacy.mechanism import plan_round

    context = institution(PrivacyPolicy(accountant="pld"))
    job = _instructions(noise_multiplier=None, target_epsilon=4.0, accountant="pld")
    reply = build_client_app()(_train_message(job), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    mechanism = plan_round(job.privacy, job.train, declared_examples=DECLARED, planned_rounds=3)
    assert metrics["noise-multiplier"] == mechanism.noise_multiplier
    rdp_sigma = plan_round(
        job.privacy.model_copy(update={"accountant": "rdp"}),
        job.train,
        declared_examples=DECLARED,
        planned_rounds=3,
    ).noise_multiplier
    assert mechanism.noise_multiplier < rdp_sigma  # the same target buys less noise
    assert metrics["epsilon"] == pytest.approx(
        epsilon([mechanism.history_entry], 1e-5, "pld"), rel=1e-9
    )
    assert reply.content["mechanism"]["dataset-accountant"] == "pld"
    entry = Ledger(Path(context.node_config[STATE_DIR_KEY])).entries()[0]
    assert entry.accountant == "pld"


def test_a_recorded_round_indexes_the_institutions_folder_under_its_data(institution, ledger_index):
    from confide.privacy.ledger_index import LedgerIndex

    context = institution()
    assert not build_client_app()(_train_message(_instructions()), context).has_error()
    root = Path(context.node_config[STATE_DIR_KEY])
    data = InstitutionDir(root).load().data
    assert LedgerIndex(ledger_index).folders(fingerprint_file(data)) == [root.resolve()]


def test_a_moved_ledger_refuses_before_training(institution, tmp_path):
    context = institution()
    app = build_client_app()
    assert not app(_train_message(_instructions(), 1), context).has_error()
    ledger = Ledger(Path(context.node_config[STATE_DIR_KEY]))
    # What `join --ledger-from` leaves behind in the ledger it continues.
    ledger.note("moved", json.dumps({"to": str(tmp_path / "elsewhere")}))
    reply = app(_train_message(_instructions(), 2), context)
    assert reply.has_error() and reply.error.code == REFUSED_BY_POLICY  # final: never again
    assert "moved to another folder" in reply.error.reason
    assert "elsewhere" not in reply.error.reason  # a path on the institution's host
    assert [e.kind for e in ledger.entries()] == ["spend", "moved"]  # nothing trained


def test_the_limit_check_step_refuses_a_round_past_the_limit_before_anything_runs(institution):
    """`admit_round` is the whole check: it returns the refusal reply itself, and reading
    the request and checking it leaves nothing in the ledger or the node's state."""
    from confide.client.app import Admitted, TrainRequest, admit_round

    context = institution(PrivacyPolicy(max_epsilon=0.5))
    message = _train_message(_instructions(), server_round=2)
    request = TrainRequest.read(message, context, deployed_institution)
    refused = admit_round(request)
    assert isinstance(refused, Message) and refused.has_error()
    assert refused.error.code == REFUSED_BY_POLICY
    assert refused.error.reason.startswith("hospital-x refuses round 2: this round would bring")
    assert "max_epsilon 0.5" in refused.error.reason
    assert Ledger(Path(context.node_config[STATE_DIR_KEY])).entries() == []
    assert "confide.privacy.history" not in context.state
    # Within the limits the same step returns what training needs: the sigma and mechanism
    # the round's reply then reports.
    allowed = admit_round(TrainRequest.read(message, institution(), deployed_institution))
    assert isinstance(allowed, Admitted)
    assert allowed.privacy.noise_multiplier == allowed.mechanism.noise_multiplier == 1.0
    assert allowed.mechanism.declared_examples == DECLARED
    assert allowed.books.dataset == [] and allowed.books.run == []


def test_the_limit_check_step_reports_a_tampered_ledger_as_unusable(institution):
    import sqlite3

    from confide.client.app import TrainRequest, admit_round

    context = institution()
    assert not build_client_app()(_train_message(_instructions(), 1), context).has_error()
    ledger = Ledger(Path(context.node_config[STATE_DIR_KEY]))
    with sqlite3.connect(ledger.path) as connection:
        connection.execute("UPDATE entries SET noise_multiplier = 50.0")
    message = _train_message(_instructions(), 2)
    refused = admit_round(TrainRequest.read(message, context, deployed_institution))
    assert isinstance(refused, Message) and refused.error.code == LEDGER_UNUSABLE
    assert refused.error.reason.startswith("hospital-x cannot train round 2: its ledger failed")
