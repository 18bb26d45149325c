"""Privacy accounting for DP-SGD with Poisson sampling.

One DP-SGD step with sampling rate q and noise multiplier sigma is the sampled Gaussian
mechanism. Its Renyi-DP at order alpha, eps_alpha(q, sigma), composes additively over steps;
a history of (sigma, q, steps) entries therefore has

    eps_RDP(alpha) = sum_i steps_i * eps_alpha(q_i, sigma_i)

and is converted to (epsilon, delta)-DP by minimising over alpha (Balle et al. 2020, as in
Opacus's `RDPAccountant`). The PRV accountant (Gopi et al. 2021) is tighter and available too.

The history, not epsilon, is what must be carried between rounds: epsilons do not add up, and
an accountant rebuilt from scratch each round reports one round's spend forever.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

# Opacus is imported inside the functions: importing it pulls in torch.distributed (about 2 s
# on this class of machine), and a deployed ClientApp is a new process for every message; the
# messages that do not train (query, evaluate) should not pay for it.


@contextmanager
def _quiet_orders() -> Iterator[None]:
    """Opacus warns when the best RDP order is at the end of its range: the bound is still
    valid (only possibly loose), and a search over sigma visits such ends on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        yield


# (noise_multiplier, sample_rate, steps), Opacus's own history format.
HistoryEntry = tuple[float, float, int]

# Opacus's RDPAccountant.DEFAULT_ALPHAS (checked by a test).
RDP_ORDERS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def epsilon(history: list[HistoryEntry], delta: float, accountant: str = "rdp") -> float:
    """Cumulative epsilon at `delta` of every DP-SGD step in `history` (0 if empty).

    For RDP this is Opacus's computation with the per-step RDP curve of each (sigma, q) cached:
    the curve is the expensive part and it scales linearly with the step count.
    """
    if not history:
        return 0.0
    if any(sigma <= 0.0 for sigma, _, steps in history if steps):
        return float("inf")  # a step without noise has no finite guarantee
    from opacus.accountants import create_accountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    if accountant == "rdp":
        total = sum(steps * _rdp_per_step(sigma, rate) for sigma, rate, steps in history)
        with _quiet_orders():
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)
        return float(eps)
    acct = create_accountant(accountant)
    acct.history = list(history)
    return float(acct.get_epsilon(delta=delta))


@lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    from opacus.accountants.analysis import rdp as rdp_analysis

    return np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS
        )
    )


def sample_rate_and_steps(examples: int, batch_size: int) -> tuple[float, int]:
    """Poisson rate q and steps per epoch exactly as Opacus's DPDataLoader derives them:
    q = 1 / ceil(n / B) and int(1 / q) steps (one fewer than ceil(n / B) when 1 / q rounds
    down in floating point)."""
    batches = max(1, -(-examples // batch_size))
    rate = 1.0 / batches
    return rate, int(1 / rate)


@lru_cache(maxsize=256)
def noise_for_budget(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Smallest sigma whose `steps` steps at rate `sample_rate` stay within (epsilon, delta)."""
    from opacus.accountants.utils import get_noise_multiplier

    with _quiet_orders():
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
        )
