"""PNG plots of a run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt

from confide.server.history import JobHistory


def plot_metrics(history: JobHistory, path: Path, title: str) -> None:
    """Test accuracy and loss of the global model per round (round 0 = initial model)."""
    rounds = [0] + [r.round for r in history.rounds]
    accuracy = [history.initial_metrics["accuracy"]] + [r.accuracy for r in history.rounds]
    loss = [history.initial_metrics["loss"]] + [r.loss for r in history.rounds]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(rounds, accuracy, marker=".")
    left.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="accuracy")
    right.plot(rounds, loss, marker=".", color="tab:red")
    right.set(xlabel="round", ylabel="test loss (cross-entropy)", title="loss")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_epsilon(history: JobHistory, path: Path, title: str, *, sample_level: bool = True) -> None:
    """Cumulative epsilon after each round: each institution's (sample level, this run, when
    it trained with DP-SGD) and, with central DP, the federation's (institution level)."""
    figure, axis = plt.subplots(figsize=(7, 4))
    institutions = (
        sorted({name for r in history.rounds for name in r.epsilons}, key=_order)
        if sample_level
        else []
    )
    rounds = [0] + [r.round for r in history.rounds]
    many = len(institutions) > 20
    for name in institutions:
        values, last = [0.0], 0.0
        for record in history.rounds:
            last = record.epsilons.get(name, last)
            values.append(last)
        axis.plot(
            rounds,
            values,
            color="tab:blue" if many else None,
            alpha=0.15 if many else 1.0,
            label=None if many else f"institution {name}",
            linewidth=1,
        )
    if institutions:
        axis.plot(
            rounds,
            [0.0] + [r.epsilon_max for r in history.rounds],
            color="black",
            linestyle="--",
            label="sample level, max over institutions",
        )
    if any(r.central_epsilon is not None for r in history.rounds):
        axis.plot(
            rounds,
            [0.0] + [r.central_epsilon or 0.0 for r in history.rounds],
            color="tab:red",
            linewidth=2,
            label="institution level (central DP)",
        )
    axis.set(xlabel="round", ylabel="cumulative epsilon", title=f"{title}: privacy spend")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:  # nothing to label when no institution trained
        axis.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _order(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (1 << 30, name)
