"""Scenario files: bundled ones are valid, overrides win, errors name file and field."""

from __future__ import annotations

import pytest

from confide.simulations.runner import RunError, prepare
from confide.simulations.scenario import ScenarioError, bundled_scenarios, load_scenario


@pytest.mark.parametrize("name", sorted(bundled_scenarios()))
def test_every_bundled_scenario_is_valid_and_named_after_its_file(name):
    scenario = load_scenario(name)
    assert scenario.name == name
    assert scenario.federation.min_available <= scenario.simulation.institutions


def test_required_bundled_scenarios_exist():
    assert {"digits-dp", "digits-nodp", "breast-cancer-dp", "synthetic-1000"} <= set(
        bundled_scenarios()
    )


def test_synthetic_1000_samples_a_tenth_with_dp():
    scenario = load_scenario("synthetic-1000")
    assert scenario.simulation.institutions == 1000
    assert scenario.federation.fraction_train == pytest.approx(0.1)
    assert scenario.privacy.enabled


def test_synthetic_10000_samples_a_hundred_of_ten_thousand_with_dp():
    scenario = load_scenario("synthetic-10000")
    assert scenario.simulation.institutions == 10_000
    assert int(10_000 * scenario.federation.fraction_train) == 100
    assert scenario.federation.min_available == 10_000
    assert scenario.privacy.enabled
    assert scenario.task.samples // scenario.simulation.institutions == 120  # as synthetic-1000


def test_overrides_replace_nested_values_and_keep_the_rest():
    scenario = load_scenario("digits-dp", {"federation": {"rounds": 3}, "seed": 9})
    assert scenario.federation.rounds == 3 and scenario.seed == 9
    assert scenario.federation.min_available == load_scenario("digits-dp").federation.min_available


def test_job_is_the_scenario_without_simulation_settings():
    scenario = load_scenario("digits-dp")
    job = scenario.job()
    assert job.federation == scenario.federation and job.privacy == scenario.privacy
    assert not hasattr(job, "simulation")


def test_institutions_flag_shrinks_minimums_to_fit():
    scenario = prepare("digits-dp", {"simulation": {"institutions": 3}}, fit_minimums=True)
    assert scenario.simulation.institutions == 3
    assert scenario.federation.min_available == 3


def test_error_lists_every_problem_with_the_file(tmp_path):
    path = tmp_path / "two-problems.toml"
    path.write_text("[train]\nlr = -1\n[privacy]\ndelta = 2\n")
    with pytest.raises(ScenarioError) as caught:
        load_scenario(str(path))
    message = str(caught.value)
    assert str(path) in message
    assert "train.lr" in message and "0.0 < value <= 100.0" in message
    assert "privacy.delta" in message and "0.0 < value < 1.0" in message


def test_prepare_turns_scenario_errors_into_run_errors():
    with pytest.raises(RunError, match=r"federation\.rounds"):
        prepare("digits-dp", {"federation": {"rounds": 0}}, fit_minimums=False)


def test_budget_and_central_dp_scenarios_carry_their_privacy_settings(tmp_path):
    budget = load_scenario("digits-budget")
    assert budget.simulation.policy is not None and budget.simulation.policy.max_epsilon == 6.0
    source = budget.data_source(tmp_path)
    assert source.policy == budget.simulation.policy and source.state == tmp_path
    central = load_scenario("digits-central-dp").job().central_privacy
    assert central.enabled and central.noise_multiplier == 2.0 and central.max_epsilon == 10.0
    assert load_scenario("digits-dp").simulation.policy is None  # recorded, not limited


def test_a_policy_with_an_out_of_range_limit_is_refused_with_the_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        "[simulation]\npolicy = { max_epsilon = -1 }\n[central_privacy]\nclipping_norm = 0\n"
    )
    with pytest.raises(ScenarioError) as error:
        load_scenario(str(path))
    assert "simulation.policy.max_epsilon" in str(error.value)
    assert "central_privacy.clipping_norm" in str(error.value)


def test_virtual_institutions_declare_their_partition_size_rounded_by_default():
    scenario = load_scenario("breast-cancer-dp")
    split = scenario.data_source().split()
    sizes = [len(local.train) for local in split.institutions]
    assert sizes == [70, 153, 159]  # the partition the bundled scenario makes (seed 0)
    assert scenario.declared_sizes(split) == (70, 150, 160)
    assert [scenario.data_source().declared_size(i) for i in range(3)] == [70, 150, 160]


def test_declared_sizes_can_be_one_for_all_or_one_per_institution():
    split = load_scenario("breast-cancer-dp").data_source().split()
    one = load_scenario("breast-cancer-dp", {"simulation": {"declared_examples": 120}})
    assert one.declared_sizes(split) == (120, 120, 120)
    each = load_scenario("breast-cancer-dp", {"simulation": {"declared_examples": [60, 150, 170]}})
    assert each.declared_sizes(split) == (60, 150, 170)
    assert each.data_source().declared_size(2) == 170


@pytest.mark.parametrize(
    ("value", "message"),
    [([100, 100], "lists 2 sizes for 3 institutions"), (0, "between 1 and 100000000")],
)
def test_bad_declared_sizes_are_refused_with_the_field(value, message):
    with pytest.raises(ScenarioError, match=message):
        load_scenario("breast-cancer-dp", {"simulation": {"declared_examples": value}})


def test_a_relative_data_path_is_the_scenario_files_from_any_working_folder(tmp_path, monkeypatch):
    (tmp_path / "project" / "data").mkdir(parents=True)
    scenario = tmp_path / "project" / "mine.toml"
    scenario.write_text('[task]\nname = "csv"\npath = "data/records.csv"\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_scenario(str(scenario))
    assert loaded.task.path == (tmp_path / "project" / "data" / "records.csv").resolve()
    monkeypatch.chdir(tmp_path / "project")  # the same file, from its own folder
    assert load_scenario("mine.toml").task.path == loaded.task.path


def test_a_data_path_given_as_an_override_is_the_working_folders(tmp_path, monkeypatch):
    scenario = tmp_path / "mine.toml"
    scenario.write_text('[task]\nname = "csv"\npath = "data/records.csv"\n')
    monkeypatch.chdir(tmp_path.parent)
    loaded = load_scenario(str(scenario), {"task": {"path": "mine/records.csv"}})
    assert loaded.task.path == (tmp_path.parent / "mine" / "records.csv").resolve()


def test_a_saved_scenario_loads_again_as_the_same_scenario_from_another_folder(
    tmp_path, monkeypatch
):
    """What a run saves (simulations/report.py writes this dump) is the scenario it ran."""
    import tomli_w

    (tmp_path / "project").mkdir()
    first = tmp_path / "project" / "mine.toml"
    first.write_text('seed = 3\n[task]\nname = "csv"\npath = "records.csv"\nlabel_column = "y"\n')
    loaded = load_scenario(str(first), {"federation": {"rounds": 2}})
    saved = tmp_path / "run" / "scenario.toml"
    saved.parent.mkdir()
    saved.write_text(tomli_w.dumps(loaded.model_dump(mode="json", exclude_none=True)))
    assert "samples" not in saved.read_text()  # the csv task has no synthetic sizes
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_scenario(str(saved)) == loaded
