"""`confide-client join`: the size an institution publishes, and its local delta check."""

from __future__ import annotations

import tomllib


def test_join_declares_the_training_examples_rounded_and_says_it_publishes_them(join_cli, tmp_path):
    # records: 40 rows, 10 % held out for validation (ceil(4)): 36 training examples.
    joined = join_cli("hospital-a")
    assert joined.returncode == 0, joined.stderr
    settings = tomllib.loads((tmp_path / "hospital-a" / "institution.toml").read_text())
    assert settings["declared_examples"] == 36
    assert settings["noise_generator"] == "csprng"
    assert "declared size: 36 examples (published" in " ".join(joined.stdout.split())


def test_join_refuses_a_max_delta_not_below_one_over_n_before_registering(
    join_cli, enrollment_coordinator, tmp_path
):
    refused = join_cli("hospital-a", "--max-delta", "0.03")
    assert refused.returncode == 2
    assert "max_delta = 0.03 is not below 1/36" in " ".join(refused.stderr.split())
    assert enrollment_coordinator["registrar"].registered == []
    assert not (tmp_path / "hospital-a").exists()


def test_join_takes_a_declared_size_and_warns_when_it_is_far_from_the_data(join_cli, tmp_path):
    joined = join_cli("hospital-a", "--declared-examples", "1000")
    assert joined.returncode == 0, joined.stderr
    settings = tomllib.loads((tmp_path / "hospital-a" / "institution.toml").read_text())
    assert settings["declared_examples"] == 1000
    assert "declared_examples = 1000, but the data holds 36" in " ".join(joined.stdout.split())
