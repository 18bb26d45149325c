"""The bundled digits-cnn-dp scenario: digits-dp's data, institutions and privacy, a CNN."""

from __future__ import annotations

from confide.simulations.engine import preflight
from confide.simulations.scenario import load_scenario


def test_digits_cnn_dp_loads_as_a_cnn_on_digit_images():
    scenario = load_scenario("digits-cnn-dp")
    assert scenario.name == "digits-cnn-dp"
    assert scenario.task.name == "digits-images"
    assert scenario.task.model.kind == "cnn"


def test_digits_cnn_dp_keeps_digits_dps_data_institutions_privacy_and_rounds():
    cnn, mlp = load_scenario("digits-cnn-dp"), load_scenario("digits-dp")
    assert cnn.seed == mlp.seed
    assert cnn.simulation == mlp.simulation
    assert cnn.data == mlp.data
    assert cnn.privacy == mlp.privacy
    assert cnn.privacy.target_epsilon == 8.0
    assert cnn.federation == mlp.federation


def test_digits_cnn_dp_passes_the_simulations_preflight():
    scenario = load_scenario("digits-cnn-dp")
    split = scenario.data_source().split()
    assert split.shape == (1, 8, 8)
    preflight(scenario, split)


def test_an_image_scenario_is_exported_as_npz_archives_of_its_images(tmp_path):
    from confide.simulations.export import export_institutions
    from confide.simulations.runner import prepare
    from confide.tasks.datasets import load_npz

    scenario = prepare("digits-cnn-dp", {"simulation": {"institutions": 2}}, fit_minimums=True)
    paths = export_institutions(scenario, tmp_path)
    assert [path.name for path in paths] == ["institution-0.npz", "institution-1.npz"]
    labels = tuple(str(k) for k in range(10))
    assert load_npz(paths[0], labels).shape == (1, 8, 8)
