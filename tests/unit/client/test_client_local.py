"""The institution's local side: which device it trains on and which data it sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from confide.client.app import _history, _store_history
from confide.client.data import SimulatedInstitutions
from confide.client.device import resolve_device
from confide.privacy.instructions import RoundInstructions
from confide.tasks.config import DataConfig, TaskConfig


def _context(partition: int, partitions: int = 3, run_config: dict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": partitions},
        state=RecordDict(),
        run_config=run_config or {},
    )


@pytest.mark.parametrize(("gpu", "device"), [(True, "cuda"), (False, "cpu")])
def test_auto_device_is_cuda_exactly_when_torch_sees_a_gpu(monkeypatch, gpu, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert resolve_device("auto") == torch.device(device)
    assert resolve_device("cpu") == torch.device("cpu")  # asked for: whatever is there


def test_cuda_without_gpu_is_an_error_not_a_silent_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        resolve_device("tpu")


def test_each_virtual_institution_gets_its_own_shard():
    source = SimulatedInstitutions(TaskConfig(), DataConfig(), 3, seed=0)
    shards = [source(_context(i)).load(RoundInstructions()).train for i in range(3)]
    names = [source(_context(i)).name for i in range(3)]
    assert names == ["0", "1", "2"]
    rows = [{row.tobytes() for row in shard.x} for shard in shards]
    assert not (rows[0] & rows[1]) and not (rows[1] & rows[2])
    expected = source.split().institutions[1].train
    assert np.array_equal(shards[1].x, expected.x)


def test_flower_run_config_defines_the_simulated_layout():
    context = _context(0, partitions=4, run_config={"task.name": "breast-cancer", "seed": 3})
    source = SimulatedInstitutions.from_context(context)
    assert source.task.name == "breast-cancer" and source.seed == 3
    assert source.institutions == 4


def test_accountant_history_survives_in_the_node_state():
    context = _context(0)
    assert _history(context) == []
    history = [(1.2, 0.1, 30), (0.9, 0.2, 5)]
    _store_history(context, history)
    assert _history(context) == history


@pytest.mark.usefixtures("inside_a_run")
@pytest.mark.parametrize("noise_seed", [None, 7])
def test_the_client_app_ray_ships_still_serves_its_institution(noise_seed):
    """Ray pickles the ClientApp with every message: a closure that cannot be pickled makes
    every institution fail in simulation, and one that loses its resolver answers for the
    wrong institution. The app that comes back answers as the one that was sent."""
    import ray.cloudpickle
    from flwr.app import Message, MessageType

    from confide.client.app import build_client_app

    source = SimulatedInstitutions(TaskConfig(), DataConfig(), 3, seed=0)
    app = build_client_app(source, noise_seed=noise_seed)
    shipped = ray.cloudpickle.loads(ray.cloudpickle.dumps(app))
    for partition in range(3):
        query = Message(RecordDict(), dst_node_id=100 + partition, message_type=MessageType.QUERY)
        reply = shipped(query, _context(partition))
        assert dict(reply.content.config_records["identity"]) == {"institution": str(partition)}
