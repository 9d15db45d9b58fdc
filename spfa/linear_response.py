"""Each side's posterior widened for the other side's uncertainty (linear response).

Mean-field ``q(L) q(F)`` fits every loading as if the factors were known: its
variance is, near enough, that of ``l_i`` given ``F``. But ``F`` is uncertain,
and the best ``l_i`` moves with it. To first order (the linear response of
Giordano, Broderick & Jordan 2015, taken one block at a time), with
``ell_ij = log p(x_ij | eta_ij)`` at the plug-in ``eta = E[L] E[F]^T + ...``,
``g_ij`` and ``h_ij`` its first and second derivatives in ``eta_ij``, and
``tau`` the prior's precision (:meth:`spfa.priors.Family.prior_precision`)::

    A_i   = diag(tau) - sum_j min(h_ij, 0) f_j f_j^T            (k x k)
    C_ij  = d^2 ell_ij / dl_i df_j = h_ij f_j l_i^T + g_ij I
    dl_i  = A_i^{-1} sum_j C_ij df_j
    extra_i = diag(A_i^{-1} M_i A_i^{-1}),   M_i = sum_j C_ij V_j C_ij^T

with ``V_j = diag(Var_q(f_j))`` and means for ``l_i`` and ``f_j``. Each normal
component of ``q(l_i)`` then gains ``extra_i`` in variance; the same with the
roles of ``L`` and ``F`` swapped widens ``q(F)``. (Clipping ``h`` at 0 keeps
``A_i`` positive definite where a likelihood is not log-concave.) The intercept
``b_j`` and the covariate effects ``B_j`` are on the features' side too, with
known coefficients on the samples' (1 and ``z_i``): their variance enters ``M_i``
as ``sum_j h_ij^2 (V[b_j] + sum_c z_ic^2 V[B_jc]) f_j f_j^T``.

``M_i`` expands into three sums over ``j``, each a product of an ``[n, p]``
grid with a ``[p, k^2]`` matrix, so the cost is ``O(n p k^2)`` with no
``[n, p, k]`` array: one pass over the data after the fit (more only where the
factors' ``[p, k, k]`` sums exceed ``FACTOR_ENTRIES``). On the sanity designs'
dense factor the loadings' intervals, 1.5-1.6x too narrow under mean-field VI
in the count designs, become about 1.2x too narrow; the factors', about right,
widen little (see the README).

Only families whose components are normals (``PriorFamily.widens``: point-normal,
normal mixture) are widened, so that the posterior means stay as fitted; a
truncated normal's mean would move with its scale. In a multi-view fit each
feature responds through its view's likelihood and its view's prior precision.
In a zero-truncated fit the derivatives are taken at its listed non-zero entries
only (the likelihood never sees a zero) and are 0 elsewhere on the grid. Not
covered: in the factors' widening, the intercept's and covariate effects'
uncertainty, which couple with ``f_j`` inside the same feature's block (one
block at a time leaves that out).
"""

from __future__ import annotations

import logging

import torch

from .distributed import SINGLE, Group

__all__ = ["propagated_variances"]

logger = logging.getLogger(__name__)

#: most entries of one chunk's arrays: its grid (rows x features) and its
#: ``[rows, k, k]`` sums
CHUNK_ENTRIES = 2**22
#: most entries of the factors' ``[features, k, k]`` sums held at once (float64, two of
#: them): beyond it the features are taken in blocks, one pass over the data each
FACTOR_ENTRIES = 2**25


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise outer products, ``[m, k * k]``."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def _sums(g, h, a_mean, b_mean, b_var, other_var=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row ``i`` of ``A`` against the columns ``j`` of the grid, ``[m, k, k]``
    each: ``-sum_j min(h_ij, 0) b_j b_j^T`` and ``M_i`` (the module's notation).

    Parameters
    ----------
    g, h : Tensor of shape (m, q)
        Derivatives of the log-likelihood in ``eta`` (0 where unobserved).
    a_mean : Tensor of shape (m, k)
    b_mean, b_var : Tensor of shape (q, k)
    other_var : Tensor of shape (m, q) or (q,), optional
        The variance ``eta_ij`` has from the other effects on ``b``'s side, whose
        ``a``-side coefficients are known (the intercept, coefficient 1; covariate
        effects, coefficient the covariate): it moves ``a_i`` as ``b_j``'s does.
    """
    m, k = a_mean.shape
    bb = _outer(b_mean, b_mean)
    curvature = -(h.clamp(max=0.0) @ bb)
    # sum_j h_ij^2 (sum_c a_ic^2 V_jc + other_ij) b_j b_j^T
    var = a_mean**2 @ b_var.T
    if other_var is not None:
        var = var + other_var
    term1 = (h**2 * var) @ bb
    # sum_j h_ij g_ij b_j (V_j a_i)^T
    term2 = ((h * g) @ _outer(b_mean, b_var)).view(m, k, k) * a_mean[:, None, :]
    term3 = (g**2) @ b_var
    M = term1.view(m, k, k) + term2 + term2.transpose(1, 2) + torch.diag_embed(term3)
    return curvature.view(m, k, k), M


def _extra_variance(curvature, M, tau) -> torch.Tensor:
    """``diag(A^{-1} M A^{-1})`` with ``A = diag(tau) + curvature``, float64, ``[m, k]``
    (``tau > 0``, ``[k]`` or one row per row of ``A``, ``[m, k]``); NaN in the rows where
    ``A`` is not numerically positive definite."""
    A = curvature.double() + torch.diag_embed(tau.double().expand(curvature.shape[:2]))
    chol, info = torch.linalg.cholesky_ex(A)
    left = torch.cholesky_solve(M.double(), chol)  # A^{-1} M
    both = torch.cholesky_solve(left.transpose(1, 2), chol)  # A^{-1} M A^{-1} (M symmetric)
    # M is a sum of positive semi-definite terms: a negative diagonal is rounding
    extra = torch.diagonal(both, dim1=1, dim2=2).clamp(min=0.0)
    return torch.where((info == 0)[:, None], extra, torch.full_like(extra, float("nan")))


def _derivatives(
    likelihood, x, mask, eta, log_s, rows, cols=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second derivatives of ``log p(x | eta)`` in each ``eta_ij`` (of a grid,
    or of the entries ``(rows[e], cols[e])``), 0 where the entry is unobserved or a
    derivative is not finite."""
    eta = eta.detach().requires_grad_(True)
    with torch.enable_grad():
        lp = likelihood.log_prob(x, eta, log_s, rows, cols)
        (g,) = torch.autograd.grad(lp.sum(), eta, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), eta)
    g, h = g.detach(), h.detach()
    keep = torch.isfinite(g) & torch.isfinite(h)
    if mask is not None:
        keep &= mask > 0
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    return torch.where(keep, g, zero), torch.where(keep, h, zero)


def _covered(model, side: str) -> bool:
    """Whether a side's posterior is widened: a prior family whose components are
    normals (``PriorFamily.widens``)."""
    return getattr(model, side).widens


def _chunks(data, k: int):
    """``(x, mask, rows, entries)`` blocks over every batch, each with at most
    ``CHUNK_ENTRIES`` entries in its grid and in its ``[rows, k, k]`` sums, with ``rows``
    always a tensor of sample ids; ``entries`` None. A batch of a list of entries (a
    zero-truncated fit's non-zeros) gives ``x`` None and ``entries = (local, cols,
    values)``: each entry's row within ``rows``, its feature and its value."""
    step = max(1, CHUNK_ENTRIES // max(data.shape[1], k * k))
    for i in range(data.n_batches):
        batch = data.batch(i)
        if data.entries:
            yield from _entry_chunks(batch, data.shape, step)
            continue
        rows = batch.rows
        if rows is None:
            rows = torch.arange(batch.x.shape[0], device=batch.x.device)
        for a in range(0, batch.x.shape[0], step):
            mask = None if batch.mask is None else batch.mask[a : a + step]
            yield batch.x[a : a + step], mask, rows[a : a + step], None


def _entry_chunks(batch, shape, step: int):
    """:func:`_chunks` of one batch of entries, in blocks of ``step`` rows."""
    n, p = shape
    values, device = batch.x, batch.x.device
    if batch.rows is None:  # every sample, in order
        rows, local = torch.arange(n, device=device), batch.entry_rows
    else:  # each entry's row within the batch, at a cost of the batch's size
        rows = batch.rows
        ordered, where = torch.sort(rows)
        local = where[torch.searchsorted(ordered, batch.entry_rows)]
    local, order = torch.sort(local)
    cols, values = batch.cols[order], values[order]
    starts = torch.arange(0, rows.shape[0], step, device=device)
    bounds = torch.searchsorted(local, torch.cat([starts, starts.new_tensor([rows.shape[0]])]))
    bounds = bounds.tolist()
    for c, a in enumerate(starts.tolist()):
        e0, e1 = bounds[c], bounds[c + 1]
        m = min(step, rows.shape[0] - a)
        yield None, None, rows[a : a + m], (local[e0:e1] - a, cols[e0:e1], values[e0:e1])


@torch.no_grad()
def _block(model, data, x, mask, rows, entries, other: bool):
    """The derivatives and moments of one block of rows (see :func:`_chunks`):
    ``g, h`` on its grid (0 off the entries of a list), ``E[L], V[L]`` and, if
    ``other``, the variance of ``eta`` from the intercept and covariate effects (None
    without them; only the loadings' response needs it)."""
    log_s = None if data.log_s is None else data.log_s[rows]
    covariates = None if data.covariates is None else data.covariates[rows]
    eta = model.linear_predictor(rows, covariates)
    if entries is None:
        g, h = _derivatives(model.likelihood, x, mask, eta.mean(), log_s, rows)
    else:  # the likelihood at the listed entries only (O(m k)), placed on the grid
        local, cols, values = entries
        at_log_s = None if log_s is None else log_s[local].squeeze(-1)
        at_covariates = None if covariates is None else covariates[local]
        at_eta, _ = model.eta_moments(rows[local], cols, at_covariates)
        g_e, h_e = _derivatives(model.likelihood, values, None, at_eta, at_log_s, rows[local], cols)
        g = torch.zeros((rows.shape[0], data.shape[1]), dtype=g_e.dtype, device=g_e.device)
        h = torch.zeros_like(g)
        g[local, cols], h[local, cols] = g_e, h_e
    k = model.loadings.active.shape[0]
    var = None
    if other and eta.ml.shape[1] > k:  # covariates: known loadings, their effects' variance
        var = eta.ml[:, k:] ** 2 @ eta.vf[:, k:].T
    if other and eta.vb is not None:
        var = eta.vb if var is None else var + eta.vb
    return g, h, eta.ml[:, :k], eta.vl[:, :k], var


def propagated_variances(model, data, group: Group = SINGLE, factors: bool = True) -> dict:
    """The variance each normal component of ``q(L)`` (and ``q(F)``) gains from the
    other side's uncertainty.

    Parameters
    ----------
    model : spfa.model.SparseFactorModel
        Fitted.
    data : spfa.data.RowBatches
        Its data, as dense blocks: the training data, or new rows fitted with the
        factors held fixed (then ``factors=False``).
    group : spfa.distributed.Group
        The ranks of a data-parallel fit (the factors' sums run over all rows).
    factors : bool
        Also widen ``q(F)``.

    Returns
    -------
    dict
        ``{"loadings": ndarray (n, k) or None, "factors": ndarray (p, k) or None}``
        (float64; this rank's rows for the loadings). None for a side that is not
        covered (see the module notes), not asked for, or whose widening is not
        finite (its posterior then stays mean-field, with a warning).
    """
    out = {"loadings": None, "factors": None}
    loadings = _covered(model, "loadings")
    factors = factors and _covered(model, "factors")
    if not (loadings or factors):
        return out
    n, p = data.shape
    with torch.no_grad():
        mf, vf = model.factors.moments()
        tau_l = _precision(model.loadings, model.factors.active) if loadings else None
        tau_f = _precision(model.factors, model.factors.active) if factors else None
    k = mf.shape[1]
    extra_l = torch.zeros((n, k), dtype=torch.float64, device=mf.device)
    extra_f = torch.zeros((p, k), dtype=torch.float64, device=mf.device)
    # the features in blocks whose [block, k, k] sums fit in FACTOR_ENTRIES
    width = max(1, FACTOR_ENTRIES // (k * k))
    blocks = [(a, min(a + width, p)) for a in range(0, p, width)] if factors else [(0, 0)]
    for block, (a, e) in enumerate(blocks):
        curv_f = torch.zeros((e - a, k, k), dtype=torch.float64, device=mf.device)
        M_f = torch.zeros_like(curv_f)
        for x, mask, rows, entries in _chunks(data, k):
            first = loadings and block == 0
            g, h, ml, vl, other = _block(model, data, x, mask, rows, entries, other=first)
            if first:  # the loadings, in the first pass
                extra_l[rows] = _extra_variance(*_sums(g, h, ml, mf, vf, other), tau_l)
            if factors:
                c, M = _sums(g[:, a:e].T, h[:, a:e].T, mf[a:e], ml, vl)
                curv_f += c.double()
                M_f += M.double()
        if factors:
            group.sum_(curv_f)
            group.sum_(M_f)
            tau = tau_f if tau_f.ndim == 1 else tau_f[a:e]  # a view family's is per feature
            extra_f[a:e] = _extra_variance(curv_f, M_f, tau)
    for side, extra, on in (("loadings", extra_l, loadings), ("factors", extra_f, factors)):
        if not on:
            continue
        if bool(torch.isfinite(extra).all()):
            out[side] = extra.cpu().numpy()
        else:
            logger.warning(
                "the %s' propagated variances are not finite; that posterior stays mean-field",
                side,
            )
    return out


def _precision(family, active) -> torch.Tensor:
    """The prior's precision per factor, ``[k]`` (``[m, k]`` for a view family: its
    view's per feature); 1 for a switched-off factor, whose means and variances are 0,
    so that it gains nothing whatever its prior."""
    tau = family.prior_precision()
    return torch.where(active > 0, tau, torch.ones_like(tau))
