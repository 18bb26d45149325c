"""Plain Flower on the same workload, for benchmarks: Flower's stock FedAvg and a textbook
PyTorch ClientApp (DataLoader, SGD), with no confide strategy, roster, validation or DP.

It trains the same model on the same partitions with the same hyperparameters, and evaluates
centrally on the same test set, so round times compare like with like.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from confide.client.data import SimulatedInstitutions
from confide.privacy.config import TrainConfig
from confide.simulations.scenario import ScenarioConfig
from confide.tasks.metrics import evaluate
from confide.tasks.registry import get_task
from confide.tasks.splits import FederatedSplit

ModelFactory = Callable[[FederatedSplit], nn.Module]


def plain_apps(
    scenario: ScenarioConfig, round_seconds: list[float], accuracy: list[float]
) -> tuple[ServerApp, ClientApp]:
    """(ServerApp, ClientApp); the server appends each round's seconds and test accuracy."""
    source = scenario.data_source()
    task = get_task(scenario.task.name)

    def new_model(split: FederatedSplit) -> nn.Module:
        return task.build_model(
            scenario.task, shape=split.shape, classes=split.classes, seed=scenario.seed
        )

    server = _plain_server(scenario, source, new_model, (round_seconds, accuracy))
    return server, _plain_client(scenario.train, source, new_model)


def _plain_client(
    train_cfg: TrainConfig, source: SimulatedInstitutions, new_model: ModelFactory
) -> ClientApp:
    """A textbook ClientApp: shuffled minibatch SGD on the partition, validation metrics."""
    client = ClientApp()

    @client.train()
    def train(message: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        split = source.split()
        local = split.institutions[int(context.node_config["partition-id"])].train
        model = new_model(split)
        model.load_state_dict(message.content.array_records["arrays"].to_torch_state_dict())
        loader = DataLoader(
            TensorDataset(torch.as_tensor(local.x), torch.as_tensor(local.y)),
            batch_size=train_cfg.batch_size,
            shuffle=True,
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=train_cfg.lr)
        criterion = nn.CrossEntropyLoss()
        model.train()
        for _ in range(train_cfg.local_epochs):
            for x, y in loader:
                optimizer.zero_grad()
                criterion(model(x), y).backward()
                optimizer.step()
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": len(local)}),
            }
        )
        return Message(content, reply_to=message)

    @client.evaluate()
    def evaluate_local(message: Message, context: Context) -> Message:
        split = source.split()
        local = split.institutions[int(context.node_config["partition-id"])].validation
        model = new_model(split)
        model.load_state_dict(message.content.array_records["arrays"].to_torch_state_dict())
        extra = get_task(source.task.name).metrics
        metrics = evaluate(model, local.x, local.y, classes=local.classes, extra=extra)
        metrics.pop("auroc", None)
        content = RecordDict({"metrics": MetricRecord({**metrics, "num-examples": len(local)})})
        return Message(content, reply_to=message)

    return client


def _plain_server(
    scenario: ScenarioConfig,
    source: SimulatedInstitutions,
    new_model: ModelFactory,
    records: tuple[list[float], list[float]],
) -> ServerApp:
    """Flower's stock FedAvg, evaluating centrally on the test set after each round; it
    appends each round's seconds and accuracy to `records`."""
    round_seconds, accuracy = records
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        split = source.split()
        model = new_model(split)
        federation = scenario.federation
        strategy = FedAvg(
            fraction_train=federation.fraction_train,
            fraction_evaluate=federation.fraction_evaluate,
            min_train_nodes=federation.min_train,
            min_evaluate_nodes=federation.min_evaluate,
            min_available_nodes=federation.min_available,
        )
        last = [time.perf_counter()]

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            metrics = evaluate(
                model,
                split.test.x,
                split.test.y,
                classes=split.classes,
                extra=get_task(scenario.task.name).metrics,
            )
            now = time.perf_counter()
            if server_round > 0:
                round_seconds.append(now - last[0])
                accuracy.append(metrics["accuracy"])
            last[0] = now
            return MetricRecord({**metrics})

        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=federation.rounds,
            evaluate_fn=central,
        )

    return server
