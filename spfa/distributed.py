"""The ranks a fit spans: one process, or every process of a ``torch.distributed`` group.

Data-parallel fitting splits the *rows* (samples) over processes. Each rank
holds its own rows' data, their ``q(L)`` and any other per-sample parameters;
every rank holds the same global parameters (``q(F)``, the intercept, the
priors, the likelihood's per-feature nuisance parameters). The ELBO is a sum
over rows plus the global parameters' KL, so:

* each rank's objective is its rows' terms plus ``1 / size`` of the global KL,
  and the sum over ranks is the whole ELBO;
* the global parameters' gradients are summed over ranks (``all_reduce``)
  before every step: every rank then takes the same step from the same state,
  and the global parameters stay identical without being sent;
* every quantity a decision is taken on (a window's ELBO for the stopping rule,
  a non-finite check for a roll-back, the ELBO with and without a factor for
  pruning) is summed over ranks first, so that every rank decides alike;
* the start's sums over rows (:func:`spfa.initialization.initialize_streamed`)
  are summed over ranks.

Only the engine's collectives are used (``all_reduce``, ``broadcast``), so any
backend works: gloo on CPU, nccl on GPU (where the tensors travel on the
rank's current CUDA device). Gradients are reduced as one flat buffer per step,
which also serves the sparse per-row gradients' backends that DDP cannot (nccl).

:class:`Group` is what the fitting code talks to; a fit outside any process
group gets :data:`SINGLE`, whose collectives do nothing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Group", "SINGLE", "current_group"]


class Group:
    """The processes a fit spans and the collectives it needs.

    Parameters
    ----------
    size : int
        Number of ranks (1: a fit in one process, whose collectives do nothing).
    rank : int
        This process's rank.
    device : torch.device
        Where the backend's tensors must be (CPU for gloo, the current CUDA device for
        nccl).
    """

    def __init__(self, size: int = 1, rank: int = 0, device=None):
        self.size = int(size)
        self.rank = int(rank)
        self.device = torch.device("cpu") if device is None else torch.device(device)

    @property
    def parallel(self) -> bool:
        """More than one rank."""
        return self.size > 1

    @property
    def share(self) -> float:
        """Each rank's share of a global term (the global parameters' KL): ``1 / size``."""
        return 1.0 / self.size

    def __repr__(self) -> str:
        return f"Group(size={self.size}, rank={self.rank}, device={self.device})"

    # ---------------------------------------------------------------- tensors
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (where it lives); returns it."""
        if not self.parallel:
            return tensor
        buf = tensor.to(self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf.data_ptr() != tensor.data_ptr():
            tensor.copy_(buf)
        return tensor

    def sum_gradients_(self, params) -> None:
        """Sum the gradients of ``params`` over the ranks, as one flat buffer. A parameter
        with no gradient on a rank contributes zeros there, and keeps no gradient where
        no rank has one (the optimiser then skips it, as in one process)."""
        if not self.parallel:
            return
        params = list(params)
        if not params:
            return
        grads = [_dense_grad(p) for p in params]
        had = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype)
        flat = torch.cat([g.reshape(-1) for g in grads] + [had.to(grads[0].device)])
        self.sum_(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            size = g.numel()
            p.grad = flat[offset : offset + size].view_as(p).clone()
            offset += size
        # a parameter can lack a gradient on every rank only if it lacks one here: the
        # counts are read back (a host sync) only then, not at every step
        if not bool(had.all()):
            for p, count in zip(params, flat[offset:].tolist(), strict=True):
                if count == 0:
                    p.grad = None

    def broadcast_(self, tensors) -> None:
        """Overwrite ``tensors`` with rank 0's, in place."""
        if not self.parallel:
            return
        for t in tensors:
            buf = t.detach().to(self.device)
            dist.broadcast(buf, src=0)
            if buf.data_ptr() != t.data_ptr():
                with torch.no_grad():
                    t.copy_(buf)

    # ------------------------------------------------------------------ numpy
    def sum(self, *arrays):
        """Each numpy array (or number) summed over the ranks, in float64; one
        collective for all of them. Returns one array, or a tuple for several."""
        arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
        if self.parallel:
            flat = torch.as_tensor(np.concatenate([a.ravel() for a in arrays]))
            self.sum_(flat)
            flat = flat.numpy()
            out, offset = [], 0
            for a in arrays:
                out.append(flat[offset : offset + a.size].reshape(a.shape))
                offset += a.size
            arrays = out
        return arrays[0] if len(arrays) == 1 else tuple(arrays)

    def max(self, value: float) -> float:
        """The largest ``value`` over the ranks."""
        if not self.parallel:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def bounds(self, values) -> tuple[np.ndarray, np.ndarray]:
        """The elementwise smallest and largest of ``values`` (numbers) over the ranks,
        float64."""
        values = np.asarray(values, dtype=np.float64)
        if not self.parallel:
            return values.copy(), values.copy()
        high = torch.as_tensor(values, device=self.device).clone()
        low = -high
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MAX)
        return -low.cpu().numpy(), high.cpu().numpy()

    def first(self, value: float) -> float:
        """Rank 0's ``value`` (a number)."""
        if not self.parallel:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        return -self.max(-float(bool(flag))) > 0.5

    def agree(self, fn):
        """``fn()``, with every rank learning whether it raised on any rank: the rank
        that failed raises its own error and the others a ``ValueError`` saying so,
        rather than waiting for it in the next collective. One process: ``fn()``."""
        if not self.parallel:
            return fn()
        failed = None
        try:
            out = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            failed = err
        if not self.all(failed is None):
            if failed is not None:
                raise failed
            raise ValueError(
                "another rank of this data-parallel fit rejected its input (its error says "
                "why); this rank stops with it"
            )
        return out

    def seed(self, value: int) -> int:
        """Rank 0's ``value`` (an integer seed below 2^53), so that every rank draws alike."""
        return int(self.first(int(value)))


def _dense_grad(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        return torch.zeros_like(p)
    return p.grad.to_dense() if p.grad.is_sparse else p.grad


#: a fit in one process
SINGLE = Group()


def current_group() -> Group:
    """The default process group of ``torch.distributed`` when one is initialised with
    more than one rank; otherwise :data:`SINGLE`."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    size = dist.get_world_size()
    if size <= 1:
        return SINGLE
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return Group(size, dist.get_rank(), device)
