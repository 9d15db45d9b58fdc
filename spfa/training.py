"""Optimisation loop: Adam on the Monte Carlo ELBO, a noise-aware stopping rule,
a non-finite guard that rolls back and shrinks the step, and logging hooks.

The ELBO terms of every step are kept on the device and read back once per
window of ``check_every`` steps, so a GPU fit synchronises with the host once
per window rather than once per step.

Stopping rule. Let ``m_t`` be the mean ELBO over window ``t`` and ``se_t`` the
standard error of ``m_t - m_{t-1}`` estimated from the within-window spread
(Monte Carlo noise plus drift). The optimiser has reached a plateau when
``m_t - m_{t-1} < tol * |m_t| + 2 se_t``, i.e. the improvement is below the
tolerance or indistinguishable from the noise (with ``exact=True``, for an
objective without Monte Carlo draws, ``se_t`` is 0: its spread is progress, not
noise). At the first plateau the step
size is divided by ``plateau_factor`` to let the iterates settle (with Monte
Carlo gradients a constant step leaves them jittering); the fit has converged
at the next plateau.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .distributed import SINGLE, Group
from .model import ELBOTerms

__all__ = ["TrainResult", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    n_iter: int
    converged: bool
    history: dict = field(default_factory=dict)
    #: learning-rate reductions forced by non-finite values
    n_rollbacks: int = 0
    message: str = ""
    #: stopped by KeyboardInterrupt (the module holds the last checked state)
    interrupted: bool = False

    def followed_by(self, later: TrainResult) -> TrainResult:
        """This run and a ``later`` one from where it stopped, as one record."""
        history = {k: self.history.get(k, []) + later.history.get(k, []) for k in self.history}
        return TrainResult(
            self.n_iter + later.n_iter,
            later.converged,
            history,
            self.n_rollbacks + later.n_rollbacks,
            later.message or self.message,
            later.interrupted,
        )


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s state (parameters and buffers, on their device) that
    ``module.load_state_dict`` puts back."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _snapshot(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple:
    return state_copy(module), [copy.deepcopy(opt.state_dict()) for opt in optimizers]


#: Adam's decay rates of its gradient and squared-gradient averages. torch's
#: (0.9, 0.999) keeps the squared gradients of the steep first steps in the average
#: for about a thousand steps, so the slow tail of a fit (the factors' slow rotation
#: and sparsification) moves in steps far smaller than the learning rate. Against
#: (0.9, 0.999): PBMCs (k = 10) 600 -> 350 steps, ELBO -327,048 -> -326,969;
#: CellTypist 500 -> 400 steps, -1,059,321 -> -1,059,089; 5,000 x 2,000 simulation
#: 475 -> 300 steps, error 0.1850 -> 0.1806; held-out likelihood unchanged; the
#: sanity designs' error, AP and coverage unchanged (seeds 1-20). (0.9, 0.95) took
#: more steps, and on one negative binomial design it found a higher ELBO without
#: the design's one weak factor (README, speed)
ADAM_BETAS = (0.8, 0.9)


def _adam(groups: list[dict], lr: float) -> torch.optim.Adam:
    """Adam with its fused kernel (one kernel per step rather than one per operation;
    on CPU a step of PBMC-sized parameters takes 0.44 ms against 1.25 ms), or its
    multi-tensor path where the parameters' device has no fused kernel."""
    try:
        return torch.optim.Adam(groups, lr=lr, betas=ADAM_BETAS, fused=True)
    except RuntimeError:
        return torch.optim.Adam(groups, lr=lr, betas=ADAM_BETAS, foreach=True)


def _set_lr(optimizers, lr):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


def _groups(params: list) -> list[dict]:
    """Parameters, or groups ``{"params": [...], "lr_scale": c}``, as optimiser groups."""
    groups = [g if isinstance(g, dict) else {"params": [g]} for g in params]
    return [g for g in groups if len(g["params"])]


def _flat(groups: list[dict]) -> list[torch.nn.Parameter]:
    return [p for g in groups for p in g["params"]]


def _restore(module, optimizers, snapshot, lr):
    state, opt_states = snapshot
    module.load_state_dict(state)
    for opt, opt_state in zip(optimizers, opt_states, strict=True):
        opt.load_state_dict(opt_state)
    _set_lr(optimizers, lr)


_TERMS = {
    "err": "the expected log-likelihood",
    "kl_l": "the loadings' KL",
    "kl_f": "the factors' KL",
    "kl_b": "the intercept's KL",
}


def _what_is_not_finite(module: torch.nn.Module, values: np.ndarray) -> str:
    """Which ELBO terms of a window (``[records, 5]``) and which parameters are not finite."""
    terms = [
        _TERMS[name]
        for j, name in enumerate(ELBOTerms.NAMES)
        if name in _TERMS and not np.isfinite(values[:, j]).all()
    ]
    params = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    parts = []
    if terms:
        parts.append("non-finite " + ", ".join(terms))
    if params:
        parts.append("non-finite parameters " + ", ".join(params))
    return "; ".join(parts) or "non-finite ELBO"


def _all_finite(params) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


@torch.enable_grad()  # a fit called inside torch.no_grad() still needs gradients
def train(
    module: torch.nn.Module,
    objective: Callable[[], ELBOTerms],
    params: list,
    *,
    n_observed: int,
    max_iter: int,
    tol: float,
    learning_rate: float,
    check_every: int = 50,
    steps_per_record: int = 1,
    sparse_params: list | None = None,
    plateau_factor: float = 5.0,
    n_plateaus: int = 2,
    exact: bool = False,
    max_rollbacks: int = 8,
    on_window: Callable[[int, np.ndarray], None] | None = None,
    progress: Callable[[int, float], None] | None = None,
    group: Group = SINGLE,
    shared: list | None = None,
) -> TrainResult:
    """Maximise ``objective().elbo`` over ``params`` with Adam.

    Parameters
    ----------
    module : Module
        Owner of ``params``; its state is snapshotted for roll-backs.
    objective : callable
        Returns the :class:`ELBOTerms` of the current parameters (one MC draw).
    params : list of Parameter or of dict
        What to optimise: parameters, or groups ``{"params": [...], "lr_scale":
        c}`` whose step size is ``c`` times the learning rate.
    n_observed : int
        Number of observed entries; the loss is the negative ELBO per entry.
    max_iter, tol, learning_rate : see the estimator.
    check_every : int
        Window length of the stopping rule and the host read-back (a
        multiple of ``steps_per_record``).
    steps_per_record : int
        Steps averaged into one record of the history (and one point of the
        stopping rule): 1 for full-batch training, the number of batches per
        pass for minibatch training, whose per-step values are noisy
        estimates of different batches. A record is then a whole pass, free of
        batch-to-batch spread, and the rule compares passes by ``tol`` alone.
    sparse_params : list of Parameter or of dict, optional
        Per-sample parameters that receive sparse gradients (minibatches):
        updated by :class:`torch.optim.SparseAdam`, only where used (groups as
        in ``params``).
    exact : bool
        Whether ``objective`` is exact (no Monte Carlo draws). Its spread within a
        window is then the optimiser's own progress, not noise, and the rule compares
        windows by ``tol`` alone: a steep window would otherwise pass for a noisy one.
    on_window : callable, optional
        ``on_window(first_record, terms)`` with ``terms`` of shape
        ``(records, 5)`` (``ELBOTerms.NAMES``), after every finite window.
    progress : callable, optional
        ``progress(records, elbo_per_entry)`` after every finite window: the records
        done so far and the window's mean ELBO per observed entry (a progress bar).
    group : spfa.distributed.Group
        The ranks of a data-parallel fit: ``objective`` is this rank's share of the
        ELBO, ``n_observed`` counts every rank's entries, the gradients of ``shared``
        are summed over the ranks before each step, and each window's terms and
        finiteness are summed over them before any decision.
    shared : list of Parameter, optional
        The parameters every rank holds alike (see ``group``).

    Returns
    -------
    TrainResult
        The module holds the final (or, after unrecoverable trouble, the last
        finite) parameters.
    """
    lr = learning_rate
    groups, sparse_groups = _groups(params), _groups(sparse_params or [])
    optimizers = [_adam(groups, lr)] if groups else []
    if sparse_groups:
        optimizers.append(torch.optim.SparseAdam(sparse_groups, lr=lr, betas=ADAM_BETAS))
    _set_lr(optimizers, lr)
    params = _flat(groups) + _flat(sparse_groups)
    history = {name: [] for name in ELBOTerms.NAMES}
    snapshot = _snapshot(module, optimizers)
    buffer: list[torch.Tensor] = []
    prev_mean = prev_var = None
    plateaus = 0
    rollbacks = 0
    converged = False
    message = ""
    scale = 1.0 / max(n_observed, 1)
    it = 0
    window_start = 0
    interrupted = False
    try:
        while it < max_iter:
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            terms = objective()
            loss = -terms.elbo * scale
            loss.backward()
            group.sum_gradients_(shared or [])
            for opt in optimizers:
                opt.step()
            buffer.append(terms.stacked())
            it += 1
            if len(buffer) < check_every and it < max_iter:
                continue

            values = group.sum_(torch.stack(buffer)).cpu().double().numpy()
            buffer = []
            if steps_per_record > 1:
                whole = len(values) // steps_per_record * steps_per_record
                values = values[:whole].reshape(-1, steps_per_record, values.shape[1]).mean(1)
            if not group.all(np.isfinite(values).all() and _all_finite(params)):
                rollbacks += 1
                what = _what_is_not_finite(module, values)
                if rollbacks > max_rollbacks:
                    _restore(module, optimizers, snapshot, lr)
                    message = (
                        f"the ELBO became non-finite {rollbacks} times even after the "
                        f"learning rate was reduced to {lr:.2e} (last: {what}); stopped at "
                        "the last finite state"
                    )
                    warnings.warn(message, RuntimeWarning, stacklevel=3)
                    break
                lr = lr / 4.0
                _restore(module, optimizers, snapshot, lr)
                logger.info("step %d: %s; rolled back, lr -> %.2e", it, what, lr)
                # the failed window's steps are not recorded; the budget is still spent
                window_start = it
                continue

            for j, name in enumerate(ELBOTerms.NAMES):
                history[name].extend(values[:, j].tolist())
            if on_window is not None:
                on_window(window_start // steps_per_record, values)
            window_start = it
            snapshot = _snapshot(module, optimizers)

            elbo = values[:, 0]
            mean, var = elbo.mean(), elbo.var(ddof=1) if len(elbo) > 1 else 0.0
            if steps_per_record > 1 or exact:
                var = 0.0  # whole passes (no batch-to-batch spread), or no noise at all
            if progress is not None:
                progress(it // steps_per_record, float(mean) * scale)
            logger.debug(
                "%s %6d  elbo %.6g  lr %.2e",
                "step" if steps_per_record == 1 else "pass",
                it // steps_per_record,
                mean,
                lr,
            )
            if prev_mean is not None and len(elbo) * steps_per_record == check_every:
                se = math.sqrt((var + prev_var) / len(elbo))
                if mean - prev_mean < tol * abs(mean) + 2.0 * se:
                    plateaus += 1
                    if plateaus >= n_plateaus:
                        converged = True
                        break
                    lr = lr / plateau_factor
                    _set_lr(optimizers, lr)
            prev_mean, prev_var = mean, var
    except KeyboardInterrupt:
        # keep the last checked state (finite, and the best the stopping rule has seen);
        # the caller decides whether to go on, and re-raises
        _restore(module, optimizers, snapshot, lr)
        interrupted = True
        message = (
            f"interrupted at step {it}; the state of step {window_start}, the last one "
            "checked, was kept"
        )

    return TrainResult(it, converged, history, rollbacks, message, interrupted)
