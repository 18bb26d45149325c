"""A bad scenario is refused before anything starts: clear message, non-zero exit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from confide.simulations.scenario import bundled_scenarios


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


def test_out_of_range_value_names_field_and_range(simulate, tmp_path):
    bundled = bundled_scenarios()["digits-dp"].read_text()
    path = _write(tmp_path, bundled.replace("rounds = 30", "rounds = 0"))
    result = simulate("run", path)
    assert result.returncode == 2
    assert "federation.rounds" in result.stderr
    assert "1 <= value <= 100000" in result.stderr
    assert "bad.toml" in result.stderr
    assert not (tmp_path / "results").exists()


def test_unknown_field_and_bad_choice_are_all_reported(simulate, tmp_path):
    path = _write(
        tmp_path,
        '[privacy]\ntarget_epsilon = 8.0\nnoise = 1.0\n[data.partition]\nscheme = "random"\n',
    )
    result = simulate("run", path)
    assert result.returncode == 2
    assert "privacy.noise" in result.stderr and "unknown field" in result.stderr
    assert "data.partition.scheme" in result.stderr
    assert "'iid', 'dirichlet', 'shards'" in result.stderr


def test_invalid_toml_is_reported_with_file(simulate, tmp_path):
    result = simulate("run", _write(tmp_path, "[federation\nrounds = 3\n"))
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr


def test_missing_scenario_lists_bundled_ones(simulate):
    result = simulate("run", "no-such-scenario")
    assert result.returncode == 2
    assert "digits-dp" in result.stderr


def test_flag_override_is_validated_too(simulate):
    result = simulate("run", "digits-dp", "--rounds", "-1")
    assert result.returncode == 2
    assert "federation.rounds" in result.stderr


def test_minimum_above_institutions_is_refused(simulate, tmp_path):
    bundled = bundled_scenarios()["digits-dp"].read_text()
    path = _write(tmp_path, bundled.replace("institutions = 5", "institutions = 3"))
    result = simulate("run", path)
    assert result.returncode == 2
    assert "min_available" in result.stderr and "wait forever" in result.stderr


def test_list_shows_every_bundled_scenario(simulate):
    result = simulate("list")
    assert result.returncode == 0, result.stderr
    for name in ("digits-dp", "digits-nodp", "breast-cancer-dp", "synthetic-1000"):
        assert name in result.stdout


def test_help_explains_commands(simulate):
    result = simulate("--help")
    assert result.returncode == 0
    for command in ("run", "list", "bench"):
        assert command in result.stdout
    run_help = simulate("run", "--help").stdout
    for flag in ("--rounds", "--institutions", "--seed", "--out", "--device"):
        assert flag in run_help


def _scenario_with(tmp_path: Path, old: str, new: str) -> str:
    bundled = bundled_scenarios()["digits-dp"].read_text()
    assert old in bundled
    return _write(tmp_path, bundled.replace(old, new))


def test_delta_not_below_one_over_n_is_refused_before_ray_starts(simulate, tmp_path):
    result = simulate("run", _scenario_with(tmp_path, "delta = 1e-5", "delta = 0.01"))
    assert result.returncode == 2
    assert "privacy.delta = 0.01" in result.stderr and "1/N" in result.stderr
    assert "declared size" in result.stderr
    assert not any((tmp_path / "results").iterdir())


def test_unreachable_target_epsilon_is_refused_before_ray_starts(simulate, tmp_path):
    path = _scenario_with(tmp_path, "target_epsilon = 8.0", "target_epsilon = 0.001")
    result = simulate("run", path)
    assert result.returncode == 2
    assert "privacy.target_epsilon" in result.stderr and "cannot be met" in result.stderr


def test_unwritable_results_folder_is_refused_before_the_run(simulate, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = simulate("run", "digits-dp", "--out", str(blocker / "results"))
    assert result.returncode == 2
    assert "--out" in result.stderr


def test_scenario_that_is_not_utf8_is_refused_with_the_file(simulate, tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('description = "caf\xe9"\n'.encode("latin-1"))
    result = simulate("run", str(path))
    assert result.returncode == 2
    assert "latin1.toml" in result.stderr and "cannot read" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal exists only without a GPU")
def test_cuda_without_a_gpu_is_refused_before_ray_starts(simulate):
    result = simulate("run", "digits-dp", "--device", "cuda")
    assert result.returncode == 2
    assert "simulation.device" in result.stderr


def test_export_writes_one_csv_per_institution_readable_by_join(simulate, tmp_path):
    from confide.tasks.datasets import load_csv

    result = simulate("export", "digits-dp", "--institutions", "3", "--out", "shares")
    assert result.returncode == 0, result.stderr
    files = sorted((tmp_path / "shares").glob("institution-*.csv"))
    assert [f.name for f in files] == [f"institution-{i}.csv" for i in range(3)]
    sizes = [len(load_csv(f, "label", tuple(str(k) for k in range(10)))) for f in files]
    assert sum(sizes) == 1797 - 360  # everything but the coordinator's held-out test set


def test_join_needs_exactly_one_token_source(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    client = Path(sys.executable).with_name("confide-client")
    data = tmp_path / "d.csv"
    data.write_text("a,label\n1,0\n2,1\n")
    refused = subprocess.run(
        [str(client), "join", "--server", "127.0.0.1:1", "--dir", str(tmp_path / "i"),
         "--data", str(data)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2 and "exactly one of --token and --token-file" in refused.stderr
