"""What a fit records while it trains: TensorBoard scalars and the in-memory history.

Tags (the seed notebook's): ``loss/elbo``, ``loss/err`` (expected
log-likelihood), ``loss/kl_l``, ``loss/kl_f``, ``loss/kl_b`` every step (every
pass, as the mean of its steps, in minibatch training); and the learned
per-factor priors, ``prior/{loadings,factors}_<key>/<k>`` for each per-factor
value of the families' ``prior_summary`` (``pi`` and ``scale`` for the
point-normal family; ``prior/factors_<key>/<view>/<k>`` per view of a multi-view
fit), once per window of the stopping rule. ``prior_history``
holds the same values, keyed ``{loadings,factors}_prior_<key>``.
"""

from __future__ import annotations

import numpy as np

from ._convert import to_numpy
from .model import ELBOTerms, SparseFactorModel

__all__ = ["Monitor"]


class Monitor:
    """Callback for :func:`spfa.training.train` (``on_window``).

    Parameters
    ----------
    model : SparseFactorModel
    log_dir : str or path, optional
        Where to write a TensorBoard run; None keeps the history in memory only.
    """

    def __init__(self, model: SparseFactorModel, log_dir=None):
        self.model = model
        #: records before this run's (a later training phase continues the steps)
        self.offset = 0
        self.prior_history = {key: [] for key in self.priors()}
        self.prior_history["step"] = []
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def priors(self) -> dict[str, np.ndarray]:
        """The learned priors now, ``{side}_{key}`` -> ``(k,)`` or ``(k, ...)`` arrays."""
        out = {}
        for side in ("loadings", "factors"):
            for key, value in getattr(self.model, side).prior_summary().items():
                out[f"{side}_{key}"] = to_numpy(value)
        return out

    def __call__(self, first_step: int, terms: np.ndarray) -> None:
        first_step += self.offset
        last_step = first_step + len(terms)
        priors = self.priors()
        for key, value in priors.items():
            self.prior_history[key].append(value.tolist())
        self.prior_history["step"].append(last_step)
        if self.writer is None:
            return
        for i, row in enumerate(terms):
            for name, value in zip(ELBOTerms.NAMES, row, strict=True):
                self.writer.add_scalar(f"loss/{name}", value, first_step + i + 1)
        views = getattr(self.model.factors, "views", None)
        for key, value in priors.items():
            tag = key.replace("_prior_", "_")
            if value.ndim == 1:
                for k, v in enumerate(value):
                    self.writer.add_scalar(f"prior/{tag}/{k}", v, last_step)
            elif views is not None and key.startswith("factors") and value.ndim == 2:
                for k, row in enumerate(value):  # a multi-view fit's factors: per view
                    for name, v in zip(views.names, row, strict=True):
                        self.writer.add_scalar(f"prior/{tag}/{name}/{k}", v, last_step)
            # others (e.g. mixture weights): in the history only

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
