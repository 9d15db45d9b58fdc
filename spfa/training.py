"""Optimisation loop: Adam on the Monte Carlo ELBO, a noise-aware stopping rule,
a non-finite guard that rolls back and shrinks the step, and logging hooks.

The ELBO terms of every step are kept on the device and read back once per
window of ``check_every`` steps, so a GPU fit synchronises with the host once
per window rather than once per step.

Stopping rule. Let ``m_t`` be the mean ELBO over window ``t`` and ``se_t`` the
standard error of ``m_t - m_{t-1}`` estimated from the within-window spread
(Monte Carlo noise plus drift). The optimiser has reached a plateau when
``m_t - m_{t-1} < tol * |m_t| + 2 se_t``, i.e. the improvement is below the
tolerance or indistinguishable from the noise. At the first plateau the step
size is divided by ``plateau_factor`` to let the iterates settle (with Monte
Carlo gradients a constant step leaves them jittering); the fit has converged
at the next plateau.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .model import ELBOTerms

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    n_iter: int
    converged: bool
    history: dict = field(default_factory=dict)
    #: learning-rate reductions forced by non-finite values
    n_rollbacks: int = 0
    message: str = ""


def _snapshot(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return state, copy.deepcopy(optimizer.state_dict())


def _restore(module, optimizer, snapshot, lr):
    state, opt_state = snapshot
    module.load_state_dict(state)
    optimizer.load_state_dict(opt_state)
    for group in optimizer.param_groups:
        group["lr"] = lr


def _all_finite(params) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def train(
    module: torch.nn.Module,
    objective: Callable[[], ELBOTerms],
    params: list[torch.nn.Parameter],
    *,
    n_observed: int,
    max_iter: int,
    tol: float,
    learning_rate: float,
    check_every: int = 50,
    plateau_factor: float = 5.0,
    n_plateaus: int = 2,
    max_rollbacks: int = 8,
    on_window: Callable[[int, np.ndarray], None] | None = None,
    verbose: bool = False,
) -> TrainResult:
    """Maximise ``objective().elbo`` over ``params`` with Adam.

    Parameters
    ----------
    module : Module
        Owner of ``params``; its state is snapshotted for roll-backs.
    objective : callable
        Returns the :class:`ELBOTerms` of the current parameters (one MC draw).
    params : list of Parameter
        What to optimise.
    n_observed : int
        Number of observed entries; the loss is the negative ELBO per entry.
    max_iter, tol, learning_rate : see the estimator.
    check_every : int
        Window length of the stopping rule and the host read-back.
    on_window : callable, optional
        ``on_window(first_step, terms)`` with ``terms`` of shape
        ``(steps, 4)`` (``ELBOTerms.NAMES``), after every finite window.

    Returns
    -------
    TrainResult
        The module holds the final (or, after unrecoverable trouble, the last
        finite) parameters.
    """
    lr = learning_rate
    optimizer = torch.optim.Adam(params, lr=lr)
    history = {name: [] for name in ELBOTerms.NAMES}
    snapshot = _snapshot(module, optimizer)
    buffer: list[torch.Tensor] = []
    prev_mean = prev_var = None
    plateaus = 0
    rollbacks = 0
    converged = False
    message = ""
    scale = 1.0 / max(n_observed, 1)
    it = 0
    window_start = 0
    while it < max_iter:
        optimizer.zero_grad(set_to_none=True)
        terms = objective()
        loss = -terms.elbo * scale
        loss.backward()
        optimizer.step()
        buffer.append(terms.stacked())
        it += 1
        if len(buffer) < check_every and it < max_iter:
            continue

        values = torch.stack(buffer).cpu().double().numpy()
        buffer = []
        if not (np.isfinite(values).all() and _all_finite(params)):
            rollbacks += 1
            if rollbacks > max_rollbacks:
                _restore(module, optimizer, snapshot, lr)
                message = (
                    f"the ELBO became non-finite {rollbacks} times even after the "
                    f"learning rate was reduced to {lr:.2e}; stopped at the last "
                    "finite state"
                )
                warnings.warn(message, RuntimeWarning, stacklevel=3)
                break
            lr = lr / 4.0
            _restore(module, optimizer, snapshot, lr)
            if verbose:
                print(f"[spfa] step {it}: non-finite ELBO; rolled back, lr -> {lr:.2e}")
            # the failed window's steps are not recorded; the budget is still spent
            window_start = it
            continue

        for j, name in enumerate(ELBOTerms.NAMES):
            history[name].extend(values[:, j].tolist())
        if on_window is not None:
            on_window(window_start, values)
        window_start = it
        snapshot = _snapshot(module, optimizer)

        elbo = values[:, 0]
        mean, var = elbo.mean(), elbo.var(ddof=1) if len(elbo) > 1 else 0.0
        if verbose:
            print(f"[spfa] step {it:6d}  elbo {mean:.6g}  lr {lr:.2e}")
        if prev_mean is not None and len(elbo) == check_every:
            se = math.sqrt((var + prev_var) / len(elbo))
            if mean - prev_mean < tol * abs(mean) + 2.0 * se:
                plateaus += 1
                if plateaus >= n_plateaus:
                    converged = True
                    break
                lr = lr / plateau_factor
                for group in optimizer.param_groups:
                    group["lr"] = lr
        prev_mean, prev_var = mean, var

    return TrainResult(it, converged, history, rollbacks, message)
