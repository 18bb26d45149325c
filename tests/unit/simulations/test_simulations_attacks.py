"""`[attack]`: each attack sends exactly what confide.simulations.attack states, attackers
are chosen reproducibly, and the virtual institutions' ClientApp applies it after honest
training (the honest app's own reply, changed only where the attack says)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from pydantic import ValidationError

from confide.client.app import build_client_app
from confide.client.data import SimulatedInstitutions
from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.privacy.instructions import RoundInstructions
from confide.server.results import AttackRecord, FinalMetrics, Results
from confide.simulations.adversity import describe, priced, simulation_client_app
from confide.simulations.attack import (
    AttackConfig,
    AttackPlan,
    FlippedLabels,
    attack_record,
    attacker_count,
    choose_attackers,
    flip_labels,
    poison_array,
)
from confide.simulations.scenario import ScenarioError, load_scenario
from confide.tasks.config import DataConfig, TaskConfig
from confide.tasks.datasets import Dataset
from confide.tasks.registry import get_task

CURRENT = np.array([[1.0, -2.0], [0.5, 0.0]], dtype=np.float32)
TRAINED = np.array([[1.5, -1.0], [0.5, -0.25]], dtype=np.float32)
DELTA = TRAINED.astype(np.float64) - CURRENT


def _poison(kind: str, scale: float = 1.0, seed: int = 0, **arrays: np.ndarray) -> np.ndarray:
    current, trained = arrays.get("current", CURRENT), arrays.get("trained", TRAINED)
    rng = np.random.default_rng(seed)
    return poison_array(kind, current=current, trained=trained, scale=scale, rng=rng)  # type: ignore[arg-type]


# -- the attacks' formulas -------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_sign_flip_sends_the_honest_change_reversed_and_scaled(scale):
    sent = _poison("sign-flip", scale)
    assert sent.dtype == np.float32
    np.testing.assert_array_equal(sent, (CURRENT - scale * DELTA).astype(np.float32))
    assert np.array_equal(_poison("sign-flip", 1.0), 2 * CURRENT - TRAINED)


@pytest.mark.parametrize("scale", [10.0, 0.5])
def test_scaling_sends_the_honest_change_times_the_scale(scale):
    sent = _poison("scaling", scale)
    np.testing.assert_array_equal(sent, (CURRENT + scale * DELTA).astype(np.float32))


def test_noise_adds_seeded_gaussian_noise_of_the_scales_std():
    current = np.zeros(200_000, dtype=np.float32)
    trained = np.full(200_000, 0.25, dtype=np.float32)
    sent = _poison("noise", 2.0, current=current, trained=trained)
    noise = sent.astype(np.float64) - 0.25
    assert abs(noise.mean()) < 0.02 and noise.std() == pytest.approx(2.0, rel=0.01)
    again = _poison("noise", 2.0, current=current, trained=trained)
    other = _poison("noise", 2.0, seed=1, current=current, trained=trained)
    assert np.array_equal(sent, again) and not np.array_equal(sent, other)


def test_nan_sends_nan_everywhere():
    sent = _poison("nan")
    assert sent.shape == TRAINED.shape and sent.dtype == np.float32 and np.isnan(sent).all()


def test_label_flip_sends_its_update_as_trained():
    assert _poison("label-flip") is TRAINED


@pytest.mark.parametrize("kind", ["sign-flip", "scaling", "noise", "label-flip", "nan"])
def test_integer_arrays_are_never_changed(kind):
    steps = np.array([7, 8], dtype=np.int64)
    assert _poison(kind, 5.0, current=np.array([3, 3], dtype=np.int64), trained=steps) is steps


def test_the_plan_poisons_every_float_array_of_an_update_and_keeps_its_layout():
    current = ArrayRecord(
        array_dict=OrderedDict(w=Array(CURRENT), steps=Array(np.array([1], dtype=np.int64)))
    )
    trained = ArrayRecord(
        array_dict=OrderedDict(w=Array(TRAINED), steps=Array(np.array([2], dtype=np.int64)))
    )
    plan = AttackPlan("scaling", 10.0, 1, frozenset({"0"}), seed=0)
    sent = plan.poison(current=current, trained=trained, server_round=1, institution="0")
    assert list(sent) == ["w", "steps"]
    np.testing.assert_array_equal(sent["w"].numpy(), (CURRENT + 10 * DELTA).astype(np.float32))
    assert sent["steps"].numpy().tolist() == [2] and sent["steps"].dtype == "int64"


def test_the_noise_differs_by_round_and_institution_and_repeats_for_each():
    record = ArrayRecord(array_dict=OrderedDict(w=Array(np.zeros(50, dtype=np.float32))))
    plan = AttackPlan("noise", 1.0, 1, frozenset({"0", "1"}), seed=3)

    def sent(server_round: int, institution: str) -> np.ndarray:
        poisoned = plan.poison(
            current=record, trained=record, server_round=server_round, institution=institution
        )
        return poisoned["w"].numpy()

    assert np.array_equal(sent(1, "0"), sent(1, "0"))
    assert not np.array_equal(sent(1, "0"), sent(2, "0"))
    assert not np.array_equal(sent(1, "0"), sent(1, "1"))


def test_label_flip_maps_each_label_to_its_mirror():
    data = Dataset(np.zeros((4, 2), dtype=np.float32), np.array([0, 3, 9, 5]), classes=10)
    flipped = flip_labels(data, 10)
    assert flipped.y.tolist() == [9, 6, 0, 4] and flipped.y.dtype == data.y.dtype
    assert flipped.x is data.x and data.y.tolist() == [0, 3, 9, 5]


def test_flipped_labels_poisons_the_training_split_only():
    source = SimulatedInstitutions(TaskConfig(), DataConfig(), 3, seed=0)
    context = _context(1)
    honest, poisoned = source(context), FlippedLabels(source)(context)
    instructions = RoundInstructions(labels=[str(k) for k in range(10)])
    clean, flipped = honest.load(instructions), poisoned.load(instructions)
    assert np.array_equal(flipped.train.y, 9 - clean.train.y)
    assert np.array_equal(flipped.train.x, clean.train.x)
    assert np.array_equal(flipped.validation.y, clean.validation.y)
    # The same dataset in its ledger: the same records, their labels poisoned.
    assert (poisoned.name, poisoned.fingerprint()) == (honest.name, honest.fingerprint())


# -- who attacks -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fraction", "institutions", "count"),
    [(0.3, 20, 6), (0.3, 10, 3), (0.25, 10, 3), (0.5, 5, 3), (0.1, 4, 0), (0.29, 100, 29)],
)
def test_the_number_of_attackers_is_the_fraction_rounded_half_up(fraction, institutions, count):
    assert attacker_count(fraction, institutions) == count


def test_drawn_attackers_are_seeded_sorted_and_as_many_as_the_fraction_says():
    attack = AttackConfig(kind="sign-flip", fraction=0.3)
    chosen = choose_attackers(attack, institutions=20, seed=4)
    assert len(chosen) == 6 and list(chosen) == sorted(set(chosen))
    assert all(0 <= index < 20 for index in chosen)
    assert choose_attackers(attack, institutions=20, seed=4) == chosen
    draws = {choose_attackers(attack, institutions=20, seed=seed) for seed in range(10)}
    assert len(draws) > 1  # the seed decides


def test_listed_attackers_are_taken_as_listed():
    attack = AttackConfig(kind="nan", institutions=[4, 1])
    assert choose_attackers(attack, institutions=5, seed=0) == (1, 4)
    with pytest.raises(ValueError, match=r"names 4; the indices are 0\.\.3"):
        choose_attackers(attack, institutions=4, seed=0)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"kind": "sign-flip"}, "exactly one of attack.fraction and attack.institutions"),
        ({"kind": "sign-flip", "fraction": 0.3, "institutions": [1]}, "exactly one"),
        ({"kind": "nan", "fraction": 0.3, "scale": 2.0}, "no meaning for kind 'nan'"),
        ({"kind": "scaling", "institutions": [1, 1]}, "distinct"),
        ({"kind": "scaling", "fraction": 1.0}, "less than 1"),
        ({"kind": "poison", "fraction": 0.5}, "sign-flip"),
    ],
)
def test_a_bad_attack_table_is_refused(table, message):
    with pytest.raises(ValidationError, match=message):
        AttackConfig.model_validate(table)


def test_default_scales_are_the_kinds():
    scales = {
        kind: AttackConfig(kind=kind, fraction=0.5).effective_scale()  # type: ignore[arg-type]
        for kind in ("sign-flip", "scaling", "noise", "label-flip", "nan")
    }
    assert scales == {
        "sign-flip": 1.0,
        "scaling": 10.0,
        "noise": 1.0,
        "label-flip": None,
        "nan": None,
    }


def test_a_scenario_refuses_attackers_it_does_not_have():
    with pytest.raises(ScenarioError, match="names 7"):
        load_scenario("digits-nodp", {"attack": {"kind": "nan", "institutions": [7]}})
    with pytest.raises(ScenarioError, match="no attacker"):
        load_scenario("digits-nodp", {"attack": {"kind": "nan", "fraction": 0.05}})


def test_the_attack_is_not_part_of_the_job():
    scenario = load_scenario("digits-nodp", {"attack": {"kind": "scaling", "fraction": 0.4}})
    assert scenario.attack is not None and scenario.attack.scale is None
    assert "attack" not in scenario.job().model_dump()


def test_the_record_names_the_attackers_and_how_they_were_chosen():
    attack = AttackConfig(kind="scaling", fraction=0.3)
    record = attack_record(attack, institutions=20, seed=4)
    chosen = choose_attackers(attack, institutions=20, seed=4)
    assert record.institutions == [str(index) for index in chosen]
    assert (record.kind, record.scale, record.chosen, record.fraction) == (
        "scaling",
        10.0,
        "drawn",
        0.3,
    )
    listed = attack_record(AttackConfig(kind="nan", institutions=[2]), institutions=5, seed=0)
    assert (listed.chosen, listed.fraction, listed.scale) == ("listed", None, None)


def test_the_summary_states_the_attack_and_its_cost():
    record = AttackRecord(
        kind="sign-flip",
        scale=1.0,
        start_round=1,
        institutions=["1", "4", "7", "9", "12", "15"],
        chosen="drawn",
        fraction=0.3,
    )
    final = FinalMetrics(
        accuracy=0.612, loss=1.0, f1_macro=0.5, epsilon_max=None, delta=None, metrics={}
    )
    results = Results.model_construct(final=final, institutions=[None] * 20, attack=record)
    assert describe(results) == (
        "accuracy 0.612 under sign-flip by 6 of 20 institutions; "
        "no clean twin run (--no-baseline, or a resumed run)"
    )
    twin = priced(results, 0.931)
    assert twin.attack is not None and twin.attack.accuracy_cost == pytest.approx(0.319)
    assert describe(twin) == (
        "accuracy 0.612 under sign-flip by 6 of 20 institutions; clean 0.931: cost 31.9 points"
    )


# -- the virtual institutions' ClientApp --------------------------------------------------
def _context(partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


def _train_message(server_round: int = 1) -> Message:
    instructions = RoundInstructions(
        task=TaskConfig(name="digits"),
        train=TrainConfig(batch_size=32, lr=0.5),
        privacy=PrivacyConfig(enabled=False),
        rounds=3,
        features=64,
        labels=[str(k) for k in range(10)],
    )
    model = get_task("digits").build_model(instructions.task, shape=(64,), classes=10, seed=0)
    config = ConfigRecord(instructions.to_config() | {"server-round": server_round})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return Message(content, dst_node_id=101, message_type=MessageType.TRAIN)


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    assert not reply.has_error(), reply.error
    return {name: array.numpy() for name, array in reply.content["arrays"].items()}


@pytest.fixture
def source() -> SimulatedInstitutions:
    return SimulatedInstitutions(TaskConfig(), DataConfig(), 3, seed=0)


@pytest.mark.usefixtures("inside_a_run")
def test_an_attacker_sends_the_attack_of_its_honest_update_and_reports_its_spend(source):
    message = _train_message()
    honest = build_client_app(source, noise_seed=5)(message, _context(1))
    plan = AttackPlan("sign-flip", 2.0, 1, frozenset({"1"}), seed=0)
    app = simulation_client_app(source, noise_seed=5, attack=plan)
    attacked = app(_train_message(), _context(1))
    current = {k: v.numpy() for k, v in message.content["arrays"].items()}
    for name, trained in _arrays(honest).items():
        expected = current[name] - 2.0 * (trained.astype(np.float64) - current[name])
        np.testing.assert_array_equal(_arrays(attacked)[name], expected.astype(trained.dtype))
    assert dict(attacked.content["metrics"]) == dict(honest.content["metrics"])
    # An honest institution, and the attacker before its start round, send the honest update.
    for partition, server_round, start in [(0, 1, 1), (1, 1, 2)]:
        plan = AttackPlan("sign-flip", 2.0, start, frozenset({"1"}), seed=0)
        app = simulation_client_app(source, noise_seed=5, attack=plan)
        sent = _arrays(app(_train_message(server_round), _context(partition)))
        clean = build_client_app(source, noise_seed=5)
        reply = _arrays(clean(_train_message(server_round), _context(partition)))
        assert all(np.array_equal(sent[name], reply[name]) for name in reply)


@pytest.mark.usefixtures("inside_a_run")
def test_a_label_flipper_trains_honestly_on_flipped_labels(source):
    plan = AttackPlan("label-flip", 0.0, 1, frozenset({"2"}), seed=0)
    sent = _arrays(
        simulation_client_app(source, noise_seed=5, attack=plan)(_train_message(), _context(2))
    )
    flipped = build_client_app(FlippedLabels(source), noise_seed=5)
    expected = _arrays(flipped(_train_message(), _context(2)))
    honest = _arrays(build_client_app(source, noise_seed=5)(_train_message(), _context(2)))
    assert all(np.array_equal(sent[name], expected[name]) for name in expected)
    assert not all(np.array_equal(sent[name], honest[name]) for name in honest)


@pytest.mark.usefixtures("inside_a_run")
def test_the_attacking_app_ray_ships_still_attacks(source):
    import ray.cloudpickle

    plan = AttackPlan("nan", 0.0, 1, frozenset({"0"}), seed=0)
    app = simulation_client_app(source, noise_seed=5, attack=plan)
    shipped = ray.cloudpickle.loads(ray.cloudpickle.dumps(app))
    sent = _arrays(shipped(_train_message(), _context(0)))
    assert all(np.isnan(array).all() for array in sent.values())
    query = Message(RecordDict(), dst_node_id=100, message_type=MessageType.QUERY)
    reply = shipped(query, _context(0))
    assert dict(reply.content.config_records["identity"]) == {"institution": "0"}
