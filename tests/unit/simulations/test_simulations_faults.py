"""`[faults]`: a seeded schedule with the configured rates, applied by the grid wrapper
(dropouts never delivered, stragglers' replies discarded) and by the ClientApp (crashes)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import replace

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from pydantic import ValidationError

from confide.client.data import LocalInstitution, SimulatedInstitutions
from confide.privacy.instructions import RoundInstructions
from confide.server.results import FaultEvent
from confide.simulations.adversity import simulation_client_app
from confide.simulations.faults import FaultPlan, FaultsConfig, FaultyGrid, faults_record
from confide.simulations.scenario import ScenarioError, load_scenario
from confide.tasks.config import DataConfig, TaskConfig

NAMES = [str(index) for index in range(50)]


def _plan(**rates: float) -> FaultPlan:
    return FaultPlan.of(FaultsConfig.model_validate(rates), seed=11)


def test_the_schedule_is_seeded():
    plan = _plan(dropout=0.2, straggler=0.2, crash=0.2)
    first = plan.schedule(rounds=20, institutions=NAMES)
    assert first == _plan(dropout=0.2, straggler=0.2, crash=0.2).schedule(
        rounds=20, institutions=NAMES
    )
    other = FaultPlan.of(FaultsConfig(dropout=0.2, straggler=0.2, crash=0.2), seed=12)
    assert other.schedule(rounds=20, institutions=NAMES) != first


def test_each_fault_happens_at_its_rate_and_at_most_one_per_round():
    plan = _plan(dropout=0.1, straggler=0.2, crash=0.05)
    events = plan.schedule(rounds=200, institutions=NAMES)  # 10,000 draws
    draws = 200 * len(NAMES)
    for kind, rate in [("dropout", 0.1), ("straggler", 0.2), ("crash", 0.05)]:
        observed = sum(event.kind == kind for event in events) / draws
        assert observed == pytest.approx(rate, abs=0.015), kind
    assert len({(event.round, event.institution) for event in events}) == len(events)


def test_no_fault_at_zero_rates_and_every_round_at_one():
    assert _plan().schedule(rounds=10, institutions=NAMES) == []
    events = _plan(crash=1.0).schedule(rounds=3, institutions=NAMES[:4])
    assert [(e.round, e.institution, e.kind) for e in events] == [
        (r, name, "crash") for r in (1, 2, 3) for name in NAMES[:4]
    ]


def test_listed_institutions_are_the_only_ones_to_fail():
    plan = FaultPlan.of(FaultsConfig(dropout=1.0, institutions=[3, 1]), seed=0)
    events = plan.schedule(rounds=2, institutions=NAMES[:5])
    assert {event.institution for event in events} == {"1", "3"}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"dropout": 0.5, "straggler": 0.4, "crash": 0.2}, "must not exceed 1"),
        ({"dropout": 1.5}, "less than or equal to 1"),
        ({"crash": -0.1}, "greater than or equal to 0"),
        ({"institutions": [2, 2]}, "distinct"),
        ({"dropout": 0.1, "timeout": 3}, "Extra inputs"),
    ],
)
def test_a_bad_faults_table_is_refused(table, message):
    with pytest.raises(ValidationError, match=message):
        FaultsConfig.model_validate(table)


def test_a_scenario_refuses_faulty_institutions_it_does_not_have():
    with pytest.raises(ScenarioError, match=r"faults\.institutions names 5"):
        load_scenario("digits-nodp", {"faults": {"crash": 0.5, "institutions": [5]}})
    scenario = load_scenario("digits-nodp", {"faults": {"crash": 0.5}})
    assert "faults" not in scenario.job().model_dump()


def test_the_record_lists_the_events_by_round_and_institution():
    events = [
        FaultEvent(round=2, institution="1", kind="crash"),
        FaultEvent(round=1, institution="3", kind="dropout"),
        FaultEvent(round=1, institution="0", kind="straggler"),
    ]
    record = faults_record(FaultsConfig(dropout=0.1, institutions=[3, 0]), events)
    assert [(e.round, e.institution) for e in record.events] == [(1, "0"), (1, "3"), (2, "1")]
    assert record.institutions == ["0", "3"] and record.clean_accuracy is None


# -- the grid wrapper ---------------------------------------------------------------------
class _Grid(Grid):
    """Every message pushed is answered at once; what was delivered is kept."""

    def __init__(self) -> None:
        self.delivered: list[Message] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's grids
            self.delivered.append(message)
            node = message.metadata.dst_node_id
            content = RecordDict({"identity": ConfigRecord({"institution": str(node - 100)})})
            replies.append(Message(content, reply_to=message))
        return replies

    def set_run(self, run: Run) -> None: ...

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:  # type: ignore[override]
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return [100 + index for index in range(6)]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        raise NotImplementedError


def _messages(kind: str, server_round: int = 1) -> list[Message]:
    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    return [Message(content, dst_node_id=100 + i, message_type=kind) for i in range(6)]


@pytest.mark.usefixtures("inside_a_run")
def test_the_grid_drops_dropouts_discards_stragglers_and_delivers_the_rest():
    plan = _plan(dropout=0.3, straggler=0.3, crash=0.2)
    inner = _Grid()
    grid = FaultyGrid(inner, plan)
    grid.send_and_receive(_messages(MessageType.QUERY), timeout=1)  # names the nodes
    assert grid.names == {100 + i: str(i) for i in range(6)}
    for server_round in (1, 2, 3):
        inner.delivered.clear()
        replies = grid.send_and_receive(_messages(MessageType.TRAIN, server_round), timeout=1)
        fault = {
            name: plan.fault(server_round=server_round, institution=name)
            for name in map(str, range(6))
        }
        delivered = {str(m.metadata.dst_node_id - 100) for m in inner.delivered}
        answered = {str(r.metadata.src_node_id - 100) for r in replies}
        assert delivered == {name for name, kind in fault.items() if kind != "dropout"}
        assert answered == {name for name, kind in fault.items() if kind in (None, "crash")}
    expected = plan.schedule(rounds=3, institutions=map(str, range(6)))
    assert sorted(grid.events, key=lambda e: (e.round, e.institution)) == expected
    assert {event.kind for event in expected} == {"dropout", "straggler", "crash"}


@pytest.mark.usefixtures("inside_a_run")
def test_evaluation_and_unnamed_nodes_meet_no_fault():
    grid = FaultyGrid(_Grid(), _plan(dropout=1.0))
    assert len(list(grid.send_and_receive(_messages(MessageType.TRAIN)))) == 6  # not yet named
    grid.send_and_receive(_messages(MessageType.QUERY))
    assert len(list(grid.send_and_receive(_messages(MessageType.EVALUATE)))) == 6
    assert list(grid.send_and_receive(_messages(MessageType.TRAIN))) == []
    assert len(grid.events) == 6 and grid.get_node_ids() == [100 + i for i in range(6)]


# -- the crash, in the ClientApp ------------------------------------------------------------
def _context(partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


@pytest.mark.usefixtures("inside_a_run")
def test_a_crashing_institution_fails_after_loading_its_data_and_records_nothing(tmp_path):
    loaded = []

    class Watched(SimulatedInstitutions):
        def __call__(self, context: Context) -> LocalInstitution:
            me = super().__call__(context)
            return replace(me, load=lambda instructions: loaded.append(1) or me.load(instructions))

    source = Watched(TaskConfig(), DataConfig(), 3, seed=0, state=tmp_path)
    app = simulation_client_app(source, noise_seed=1, faults=_plan(crash=1.0))
    instructions = RoundInstructions(labels=[str(k) for k in range(10)], features=64)
    config = ConfigRecord(instructions.to_config() | {"server-round": 2})
    train = Message(RecordDict({"config": config}), dst_node_id=101, message_type="train")
    reply = app(train, _context(1))
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == "institution 1 crashed in round 2 (a simulated fault)"
    assert loaded == [1] and not list(tmp_path.iterdir())  # no ledger was written
    query = Message(RecordDict(), dst_node_id=101, message_type=MessageType.QUERY)
    assert not app(query, _context(1)).has_error()  # only training fails
