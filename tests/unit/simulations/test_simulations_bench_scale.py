"""`bench --scale`: the 10,000-institution section states the ratio to plain Flower and the
verdict against the target."""

from __future__ import annotations

import pytest

from confide.simulations.bench import (
    SCALE_TARGET,
    Measurement,
    scale_section,
    scale_verdict,
    scale_workloads,
)


def _measured(confide_on: float, plain: float) -> list[Measurement]:
    common = {"rounds": 10, "institutions": 10_000, "peak_rss_mb": 3000.0}
    return [
        Measurement(name="confide, DP on", first_round=60.0, median_round=confide_on,
                    accuracy=0.94, epsilon_max=7.99, **common),
        Measurement(name="confide, DP off", first_round=55.0, median_round=confide_on * 0.8,
                    accuracy=0.95, epsilon_max=None, **common),
        Measurement(name="plain Flower", first_round=50.0, median_round=plain,
                    accuracy=0.95, epsilon_max=None, **common),
    ]  # fmt: skip


def test_the_verdict_says_met_at_or_under_the_target_and_missed_above():
    assert SCALE_TARGET == 0.5
    assert scale_verdict(_measured(2.0, 4.0)).endswith("measured 0.50x: met.")
    assert scale_verdict(_measured(3.0, 4.0)).endswith("measured 0.75x: MISSED.")


def test_the_section_lists_each_variant_with_its_ratio_to_plain_flower():
    scenario, _ = scale_workloads()
    section = scale_section(scenario, _measured(1.5, 4.5))
    assert section.startswith("## Scale: 10,000 institutions")
    assert "100 sampled per round" in section and "about 120 per institution" in section
    assert "| confide, DP on | on | 1.500 | 60.0 | 0.9400 | 7.990 | 3000 | 0.33 |" in section
    assert "| confide, DP off | off | 1.200 |" in section
    assert "| plain Flower | off | 4.500 | 50.0 |" in section and "| 1.00 |" in section
    assert "measured 0.33x: met." in section


def test_the_scale_workloads_differ_only_in_dp():
    dp_on, dp_off = scale_workloads()
    assert dp_on.privacy.enabled and not dp_off.privacy.enabled
    assert dp_on.model_dump(exclude={"privacy"}) == dp_off.model_dump(exclude={"privacy"})


def test_the_section_says_how_loaded_the_machine_was():
    scenario, _ = scale_workloads()
    assert "load average" not in scale_section(scenario, _measured(1.5, 4.5))
    assert "load average reached 7.5 on" in scale_section(scenario, _measured(1.5, 4.5), load=7.5)


def _engine_loop_during(monkeypatch, run) -> list[bool]:
    """Whether Flower's own dispatch loop was in place while `run` ran the engine (the
    engine itself replaced by a recorder: no Ray here)."""
    import flwr.simulation
    from flwr.server.superlink.fleet.vce import vce_api

    flowers = vce_api.add_messages_to_queue
    seen: list[bool] = []
    monkeypatch.setattr(
        flwr.simulation,
        "run_simulation",
        lambda **_: seen.append(vce_api.add_messages_to_queue is flowers),
    )
    run()
    assert vce_api.add_messages_to_queue is flowers  # put back afterwards
    return seen


def test_the_plain_flower_row_runs_flowers_own_engine(monkeypatch):
    from confide.common.errors import RunError
    from confide.simulations.bench import measure_plain
    from confide.simulations.scenario import load_scenario

    scenario = load_scenario("digits-dp", {"privacy": {"enabled": False}})

    def plain() -> None:
        with pytest.raises(RunError, match="stopped after 0 rounds"):
            measure_plain("plain Flower", scenario)

    assert _engine_loop_during(monkeypatch, plain) == [True]


def test_confides_rows_run_its_dispatch(monkeypatch):
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from confide.simulations.engine import simulate
    from confide.simulations.scenario import load_scenario

    scenario = load_scenario("digits-dp")

    def prompt() -> None:
        simulate(ServerApp(), ClientApp(), scenario, prompt=True)

    assert _engine_loop_during(monkeypatch, prompt) == [False]
