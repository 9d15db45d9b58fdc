"""The linear predictor ``eta = L F^T + 1 b^T`` under ``q``, in factored form.

Under the fully factorised ``q`` the moments of ``eta`` on a grid of ``n``
samples by ``p`` features are products of ``[n, .]`` and ``[p, .]`` matrices
(DESIGN.md)::

    E[eta] = ml mf^T + mb
    V[eta] = (vl + ml^2) vf^T + vl (mf^2)^T + vb

A likelihood with a closed form can use the factors rather than the grids:
``sum_ij x_ij E[eta_ij]`` is ``sum (x mf) * ml + colsums(x) mb``, and the
lognormal mean ``E_q[s e^eta] = exp(E[eta] + V[eta]/2 + log s)`` is one matrix
product followed by an exponential, summed by :func:`sum_exp_product` without
keeping any other ``n x p`` temporary for the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LinearPredictor", "sum_exp_product"]


class _SumExpProduct(torch.autograd.Function):
    """``sum(mask * exp(lhs rhs^T + bias))`` with its gradient from the one saved grid.

    Given ``ones``, the index of a column of ``rhs`` that is all ones, and a ``lhs`` to
    differentiate, the forward pass computes ``lhs``'s gradient ``grid rhs`` at once
    and reads the total from that column (the grid's row sums): no separate pass over
    the grid."""

    @staticmethod
    def forward(ctx, lhs, rhs, bias, mask, out, ones):
        if bias is None:
            grid = torch.matmul(lhs, rhs.T, out=out)
        else:
            grid = torch.addmm(bias, lhs, rhs.T, out=out)
        grid.exp_()
        if mask is not None:
            grid.mul_(mask)
        ctx.has_bias = bias is not None
        if ones is None:
            grad_lhs, total = None, grid.sum()
        else:
            grad_lhs = grid @ rhs
            total = grad_lhs[:, ones].sum()
        ctx.save_for_backward(lhs, rhs, grid, grad_lhs)
        return total

    @staticmethod
    def backward(ctx, grad):
        lhs, rhs, grid, grad_lhs = ctx.saved_tensors
        # d/d(lhs rhs^T + bias) of the sum is the (masked) grid itself
        if ctx.needs_input_grad[0]:
            grad_lhs = grad * (grid @ rhs if grad_lhs is None else grad_lhs)
        else:
            grad_lhs = None
        grad_rhs = grad * (grid.T @ lhs) if ctx.needs_input_grad[1] else None
        grad_bias = grad * grid.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_lhs, grad_rhs, grad_bias, None, None, None


class _SumTimesMean(torch.autograd.Function):
    """``sum((x mf) * ml)`` whose gradient in ``mf``, ``x^T ml``, is read from ``xt``,
    ``x`` transposed and stored row-major."""

    @staticmethod
    def forward(ctx, x, xt, ml, mf):
        x_mf = x @ mf
        ctx.save_for_backward(xt, ml, x_mf)
        return (x_mf * ml).sum()

    @staticmethod
    def backward(ctx, grad):
        xt, ml, x_mf = ctx.saved_tensors
        grad_ml = grad * x_mf if ctx.needs_input_grad[2] else None
        grad_mf = grad * (xt @ ml) if ctx.needs_input_grad[3] else None
        return None, None, grad_ml, grad_mf


def sum_exp_product(lhs, rhs, bias=None, mask=None, out=None, ones=None) -> torch.Tensor:
    """``sum_ij mask_ij exp((lhs rhs^T)_ij + bias_j)``, differentiable in ``lhs``, ``rhs``
    and ``bias``.

    Parameters
    ----------
    lhs : Tensor of shape (n, d)
    rhs : Tensor of shape (p, d)
    bias : Tensor of shape (p,), optional
    mask : Tensor of shape (n, p), optional
        Weights of the entries (1 observed, 0 missing); not differentiated.
    out : Tensor of shape (n, p), optional
        Memory for the grid, to reuse from one step to the next: a fresh grid larger
        than glibc's largest mmap threshold (32 MiB) is mapped anew each time and its
        pages faulted in, which at 5,000 x 2,000 doubled this function's time. While a
        backward pass still needs the grid, writing over it makes that pass raise
        (autograd's version check), never give a wrong gradient.
    ones : int, optional
        Index of a column of ``rhs`` that is all ones (not checked). When ``lhs`` is to
        be differentiated, the total is then read from the product ``grid rhs`` that
        its gradient needs anyway, instead of a separate sum over the grid.

    Returns
    -------
    Tensor (scalar)
        Computed with one ``[n, p]`` grid, exponentiated in place and kept
        for the backward pass, whose gradients are products with it.
    """
    eager = ones is not None and torch.is_grad_enabled() and lhs.requires_grad
    return _SumExpProduct.apply(lhs, rhs, bias, mask, out, ones if eager else None)


@dataclass
class LinearPredictor:
    """``eta`` on a grid ``[n, p]`` under ``q``, in factored form.

    Attributes
    ----------
    ml, vl : Tensor of shape (n, k)
        Means and variances of the loadings.
    mf, vf : Tensor of shape (p, k)
        Means and variances of the factors.
    mb, vb : Tensor of shape (p,) or None
        Mean and variance of the intercept (None without one).
    """

    ml: torch.Tensor
    vl: torch.Tensor
    mf: torch.Tensor
    vf: torch.Tensor
    mb: torch.Tensor | None = None
    vb: torch.Tensor | None = None

    def mean(self) -> torch.Tensor:
        """``E[eta]``, ``[n, p]`` (one product)."""
        if self.mb is None:
            return self.ml @ self.mf.T
        return torch.addmm(self.mb, self.ml, self.mf.T)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``E[eta]`` and ``V[eta]``, ``[n, p]`` each (one product per moment)."""
        ml, vl, mf, vf = self.ml, self.vl, self.mf, self.vf
        lhs, rhs = torch.cat([vl + ml**2, vl], 1), torch.cat([vf, mf**2], 1)
        if self.mb is None:
            return ml @ mf.T, lhs @ rhs.T
        return torch.addmm(self.mb, ml, mf.T), torch.addmm(self.vb, lhs, rhs.T)

    def sum_lognormal_mean(self, log_s=None, mask=None, out=None) -> torch.Tensor:
        """``sum_ij mask_ij exp(E[eta_ij] + V[eta_ij] / 2 + log s_i)``: the sum of
        ``E_q[s_i e^eta_ij]`` for Gaussian ``eta`` (scalar).

        Parameters
        ----------
        log_s : Tensor of shape (n, 1), optional
        mask : Tensor of shape (n, p), optional
        out : Tensor of shape (n, p), optional
            Memory for the grid (see :func:`sum_exp_product`).
        """
        ml, vl, mf, vf = self.ml, self.vl, self.mf, self.vf
        lhs = [ml, 0.5 * (vl + ml**2), 0.5 * vl]
        rhs = [mf, vf, mf**2]
        # log s and the intercept as columns against columns of ones: no broadcast copy
        ones = None
        if log_s is not None:
            lhs.append(log_s)
            rhs.append(torch.ones_like(mf[:, :1]))
            ones = 3 * mf.shape[1]
        if self.mb is not None:
            lhs.append(torch.ones_like(ml[:, :1]))
            rhs.append((self.mb + 0.5 * self.vb)[:, None])
        return sum_exp_product(torch.cat(lhs, 1), torch.cat(rhs, 1), None, mask, out, ones)

    def sum_times_mean(
        self, x: torch.Tensor, column_sums: torch.Tensor, xt: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``sum_ij x_ij E[eta_ij]`` (scalar) at the cost of ``x mf``.

        Parameters
        ----------
        x : Tensor of shape (n, p)
        column_sums : Tensor of shape (p,)
            ``x.sum(0)``.
        xt : Tensor of shape (p, n), optional
            ``x.T``, contiguous, for the gradient in ``mf``. On the CPU the product
            ``x^T ml`` read from ``x`` (column order) was 4x slower than from ``xt``
            at 5,000 x 2,000 (11.7 against 2.7 ms).
        """
        if xt is None:
            total = ((x @ self.mf) * self.ml).sum()
        else:
            total = _SumTimesMean.apply(x, xt, self.ml, self.mf)
        return total if self.mb is None else total + column_sums @ self.mb
