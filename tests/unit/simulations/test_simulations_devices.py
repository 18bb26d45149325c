"""Device selection in simulation: which device the virtual institutions use and the GPU share
Ray reserves for each (run on a CPU host; CUDA's presence is what torch reports)."""

from __future__ import annotations

import pytest
import torch

from confide.client.device import resolve_device
from confide.common.errors import SimulationError
from confide.simulations.engine import backend_config, gpus_per_institution, preflight
from confide.simulations.scenario import load_scenario


def _scenario(**simulation: object):  # type: ignore[no-untyped-def]
    return load_scenario("digits-dp", {"simulation": simulation})


def _with_gpus(monkeypatch: pytest.MonkeyPatch, count: int, cpus: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr("os.cpu_count", lambda: cpus)


def test_on_a_host_without_cuda_auto_is_the_cpu_and_no_gpu_is_reserved(monkeypatch):
    _with_gpus(monkeypatch, 0, 2)
    assert resolve_device("auto") == torch.device("cpu")
    assert gpus_per_institution(_scenario(device="auto")) == 0.0
    assert backend_config(_scenario(device="auto"))["client_resources"]["num_gpus"] == 0.0


def test_with_cuda_the_running_institutions_share_the_hosts_gpus(monkeypatch):
    _with_gpus(monkeypatch, 1, 4)
    assert resolve_device("auto") == torch.device("cuda")
    assert gpus_per_institution(_scenario(device="auto")) == 0.25
    assert gpus_per_institution(_scenario(device="cuda", cpus_per_institution=2.0)) == 0.5
    _with_gpus(monkeypatch, 8, 2)
    assert gpus_per_institution(_scenario(device="cuda")) == 1.0  # at most one GPU each
    # A CPU device reserves none even where there are GPUs; an explicit share always wins.
    assert gpus_per_institution(_scenario(device="cpu")) == 0.0
    assert gpus_per_institution(_scenario(device="cpu", gpus_per_institution=0.3)) == 0.3


def test_cuda_asked_on_a_host_without_it_is_refused_before_ray_starts(monkeypatch):
    _with_gpus(monkeypatch, 0, 2)
    scenario = _scenario(device="cuda")
    with pytest.raises(SimulationError, match=r"simulation\.device: device 'cuda' requested"):
        preflight(scenario, scenario.data_source().split())
