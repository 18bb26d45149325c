"""Metrics that judge a model on a labelled set.

loss is mean cross-entropy; precision, recall and F1 are macro averages over the classes
present in `y` (a class never predicted scores 0, not an error); AUROC is reported for binary
tasks only, from the positive class's softmax probability.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, classes: int) -> dict[str, float]:
    """Return loss, accuracy, macro precision/recall/F1 and (binary) AUROC of `model`."""
    # Lazily: scikit-learn takes ~1.7 s to import, and a deployed institution starts a new
    # process for every message; only the ones that evaluate should pay for it.
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    if len(y) == 0:
        raise ValueError("cannot evaluate on an empty set")
    model.eval()
    device = next(model.parameters()).device
    logits = model(torch.as_tensor(x, device=device))
    targets = torch.as_tensor(y, device=device)
    loss = nn.functional.cross_entropy(logits, targets).item()
    predicted = logits.argmax(dim=1).cpu().numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, predicted, average="macro", zero_division=0
    )
    metrics = {
        "loss": float(loss),
        "accuracy": float((predicted == y).mean()),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
    }
    if classes == 2 and len(np.unique(y)) == 2:
        positive = torch.softmax(logits, dim=1)[:, 1].cpu().numpy()
        metrics["auroc"] = float(roc_auc_score(y, positive))
    return metrics
