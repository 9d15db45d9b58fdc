"""The prior-family seam: what the model, the start, the summaries and persistence need.

A :class:`PriorFamily` is the prior ``g_k`` of the entries of one ``m x k``
matrix (loadings: ``m = n``; factors: ``m = p``), learned per factor by
empirical Bayes, together with the fully factorised variational posterior
``q`` of the entries. It owns, and nothing else in spfa knows:

* its variational parameters (``row_parameters``: ``[m, k d]``, ``d`` values
  per entry) and its prior hyperparameters (``prior_parameters``: ``[k, ...]``);
* ``moments`` -- ``E_q[theta]`` and ``V_q[theta]``, ``[m, k]``, which the local
  reparameterisation of ``eta = L F^T + b`` needs, and ``sample``;
* ``kl`` -- ``KL(q || g)`` in closed form, summed;
* ``update_prior_`` -- the closed-form empirical-Bayes update of ``g`` given
  ``q`` (the hyperparameters are also learned by gradient with the ELBO);
* ``posterior`` -- summaries (:class:`spfa.posterior.Posterior`): mean, sd,
  lfsr, credible intervals, PIP where the family has a point mass;
* ``start_prior_`` / ``start_`` -- a start from a point estimate, and
  ``start_posterior_`` -- new rows' start at the normal-means posterior where known;
* its saved state: the module's ``state_dict``.

``draw`` and ``log_density`` give draws of the latent variables and their log
densities under ``q`` and ``g`` (with respect to the same base measure), so
that the analytic KL can be checked against Monte Carlo by
:func:`spfa.testing.check_prior` for any family.

A factor can be switched off (``active[k] = 0``, pruning): the boundary where
``g_k`` is the point mass at zero, so ``q`` is too, and the factor's entries
have mean, variance and KL exactly zero.

A new family is one module defining a subclass and one line in
:data:`spfa.priors.PRIORS`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..posterior import Posterior

__all__ = ["Moments", "PriorFamily", "PointMassFamily"]


class Moments(NamedTuple):
    """First two posterior moments of a matrix, each ``[m, k]``."""

    mean: torch.Tensor
    var: torch.Tensor


#: a start whose values have a smaller mean square than this says nothing about the
#: prior's scale (exactly degenerate data): the families start at scale 1 instead, since
#: its inverse overflows float32 (far below any scale the validated data can give)
NEGLIGIBLE_SECOND_MOMENT = 1e-30


def start_second_moment(values) -> np.ndarray:
    """Per factor, the mean square of the start's ``values`` ``(m, k)``; 1 where it is
    negligible (:data:`NEGLIGIBLE_SECOND_MOMENT`). ``(k,)``."""
    second = np.mean(np.asarray(values, dtype=float) ** 2, axis=0)
    return np.where(second > NEGLIGIBLE_SECOND_MOMENT, second, 1.0)


def as_tensor_like(values, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=like.dtype, device=like.device)


class PriorFamily(torch.nn.Module):
    """Base class of the prior families (see the module docstring).

    Parameters
    ----------
    m, k : int
        Shape of the matrix.

    Notes
    -----
    A subclass sets ``name``, ``support`` (``"real"`` or ``"nonnegative"``),
    ``n_values`` (``d``, variational values per entry and parameter),
    ``row_parameter_names`` (created as ``[m, k d]`` zeros) and
    ``prior_parameter_names`` (``[k]``, or ``[k, d]``), and implements the
    elementwise maths on the gathered parameters: ``_moments``, ``_kl``, ``_sample``, ``_draw`` /
    ``_log_density``, plus ``start_prior_``, ``start_``, ``update_prior_``,
    ``prior_precision``, ``prior_summary`` and ``posterior``.
    """

    name: str = ""
    #: where the entries live: "real", or "nonnegative" (the start is made non-negative)
    support: str = "real"
    #: variational values per entry and parameter (mixture components; 1 otherwise)
    n_values: int = 1
    row_parameter_names: tuple[str, ...] = ()
    prior_parameter_names: tuple[str, ...] = ()
    #: buffers with one entry per factor (``[k, ...]``), reordered with the factors
    factor_buffer_names: tuple[str, ...] = ()
    #: the variational parameters in the entries' own units (a location): they scale
    #: with the data, and negating them negates the entry under ``q``
    location_parameter_names: tuple[str, ...] = ("mean",)
    #: whether the prior is symmetric about 0, so that negating a factor (:meth:`flip_`)
    #: leaves its KL unchanged (False: the factors keep their sign)
    sign_symmetric: bool = False
    #: ``q``'s components are normals whose mean does not depend on their variance, so
    #: that the other side's uncertainty can widen them (:mod:`spfa.linear_response`)
    #: without moving the posterior mean
    widens: bool = False

    def __init__(self, m: int, k: int):
        super().__init__()
        self.m, self.k = int(m), int(k)
        self.register_buffer("active", torch.ones(k))
        d = self.n_values
        for name in self.row_parameter_names:
            setattr(self, name, torch.nn.Parameter(torch.zeros(m, k * d)))
        for name in self.prior_parameter_names:
            shape = (k,) if d == 1 else (k, d)
            setattr(self, name, torch.nn.Parameter(torch.zeros(shape)))

    # -- parameters -----------------------------------------------------------
    def variational_parameters(self) -> list[torch.nn.Parameter]:
        """The per-entry parameters of ``q``, each ``[m, k d]``."""
        return [getattr(self, name) for name in self.row_parameter_names]

    def prior_parameters(self) -> list[torch.nn.Parameter]:
        """The hyperparameters of ``g``, each ``[k, ...]``."""
        return [getattr(self, name) for name in self.prior_parameter_names]

    def _rows(self, rows: torch.Tensor | None, sparse: bool) -> list[torch.Tensor]:
        """The variational parameters of all rows or of ``rows`` (``[b]``), each
        ``[b, k]``, or ``[b, k, d]`` for ``d > 1``.

        With ``sparse=True`` the rows are gathered by an embedding lookup whose
        gradient is a sparse tensor: only the rows used get an update
        (:class:`torch.optim.SparseAdam`), as minibatch training needs.
        """
        params = self.variational_parameters()
        if rows is not None:
            if sparse:
                params = [F.embedding(rows, w, sparse=True) for w in params]
            else:
                params = [w[rows] for w in params]
        if self.n_values > 1:
            params = [w.view(w.shape[0], self.k, self.n_values) for w in params]
        return params

    # -- what the model needs -------------------------------------------------
    def moments(self, rows: torch.Tensor | None = None, sparse: bool = False) -> Moments:
        """Posterior mean and variance of each entry (of the rows ``rows``), ``[m, k]``."""
        mean, var = self._moments(*self._rows(rows, sparse))
        return Moments(mean * self.active, var * self.active)

    def kl(self, rows: torch.Tensor | None = None, sparse: bool = False) -> torch.Tensor:
        """``sum KL(q || g)`` over all entries, or over the rows ``rows`` (scalar)."""
        return (self.kl_entries(rows, sparse) * self.active).sum()

    def kl_entries(self, rows: torch.Tensor | None = None, sparse: bool = False) -> torch.Tensor:
        """Elementwise ``KL(q || g)``, ``[m, k]``, ignoring ``active``."""
        return self._kl(*self._rows(rows, sparse))

    @torch.no_grad()
    def sample(
        self, generator: torch.Generator | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One draw from ``q`` of the whole matrix, or of the rows ``rows``, ``[m, k]``."""
        return self._sample(generator, *self._rows(rows, False)) * self.active

    @torch.no_grad()
    def draw(self, n_draws: int, generator: torch.Generator | None = None) -> dict:
        """``n_draws`` draws of the latent variables from ``q`` (``"value"``: ``[S, m, k]``)."""
        return self._draw(n_draws, generator, *self._rows(None, False))

    @torch.no_grad()
    def log_density(self, latent: dict, prior: bool) -> torch.Tensor:
        """``log q`` (or ``log g`` with ``prior=True``) of draws from :meth:`draw`,
        ``[S, m, k]``, with respect to the family's base measure (Lebesgue, plus
        counting measure at 0 for a point mass), so that ``KL = E_q[log q - log g]``."""
        return self._log_density(latent, prior, *self._rows(None, False))

    # -- to implement ---------------------------------------------------------
    def _moments(self, *params) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _kl(self, *params) -> torch.Tensor:
        raise NotImplementedError

    def _sample(self, generator, *params) -> torch.Tensor:
        raise NotImplementedError

    def _draw(self, n_draws, generator, *params) -> dict:
        raise NotImplementedError

    def _log_density(self, latent, prior, *params) -> torch.Tensor:
        raise NotImplementedError

    def start_prior_(self, values: np.ndarray) -> None:
        """Set ``g`` from a point estimate ``values`` (``[m', k]``, numpy) of some rows.

        The shipped families read ``values`` only through each factor's mean square (of
        the positive part, for a non-negative family); a streamed start passes one row
        of root mean squares (:meth:`spfa.initialization.Start.loadings_scale`)."""
        raise NotImplementedError

    def start_(self, values: np.ndarray, precision: np.ndarray, rows=None) -> None:
        """Set ``q`` of all rows (or of ``rows``) so that ``E_q[theta] ~ values``.

        Parameters
        ----------
        values : ndarray of shape (m', k)
            Point estimate (e.g. from the SVD start); a non-negative family
            uses its positive part.
        precision : ndarray of shape (m', k)
            Precision that the data give each entry (coordinate ascent given
            the other side); the prior's is added.
        rows : array of int, optional
        """
        raise NotImplementedError

    def start_posterior_(self, values: np.ndarray, precision: np.ndarray, rows=None) -> None:
        """Set ``q`` of all rows (or of ``rows``) to the family's posterior under the
        current prior given ``values`` observed with ``precision`` (the normal-means
        problem), where it has one in closed form; by default :meth:`start_`.

        Starts new rows (``transform``, ``score``) nearer their optimum.

        Parameters
        ----------
        values, precision, rows
            As in :meth:`start_`; ``precision`` excludes the prior's.
        """
        self.start_(values, precision, rows)

    def update_prior_(self) -> None:
        """The empirical-Bayes update: ``g`` that minimises ``sum KL(q || g)`` given ``q``."""
        raise NotImplementedError

    def prior_precision(self) -> torch.Tensor:
        """Precision of a normal with the slab's second moment, ``[k]`` (``[m, k]`` for a
        :class:`~spfa.priors.ViewFamily`, whose prior differs between views): the ridge
        penalty of the projections that start new rows, and the prior's curvature in
        :mod:`spfa.linear_response`."""
        raise NotImplementedError

    def prior_summary(self) -> dict[str, torch.Tensor]:
        """The learned prior, per factor (``[k]`` or ``[k, ...]``); reported by the
        estimator as ``{loadings,factors}_<key>_`` and logged to TensorBoard."""
        raise NotImplementedError

    def posterior(self, extra_var: np.ndarray | None = None) -> Posterior:
        """Summaries of ``q`` (float64 numpy), with switched-off factors exactly 0.

        Parameters
        ----------
        extra_var : ndarray of shape (m, k), optional
            Variance that each normal component of ``q`` gains (the other side's
            uncertainty, :mod:`spfa.linear_response`); None: ``q`` as fitted.
        """
        raise NotImplementedError

    def _widened(self, log_prec: torch.Tensor, extra_var) -> torch.Tensor:
        """Components' log-precisions (``[m, k]`` or ``[m, k, d]``) after each gains
        ``extra_var`` (``[m, k]``) in variance (only for a family that ``widens``)."""
        if extra_var is None:
            return log_prec
        if not self.widens:
            raise ValueError(f"the {self.name} family's posterior is not widened")
        extra = np.asarray(extra_var, dtype=np.float64)
        if extra.shape != (self.m, self.k) or not np.all(np.isfinite(extra) & (extra >= 0)):
            raise ValueError(
                f"extra_var must be finite, non-negative and of shape {(self.m, self.k)}"
            )
        extra = torch.as_tensor(extra, device=log_prec.device)
        extra = extra.reshape(extra.shape + (1,) * (log_prec.ndim - extra.ndim))
        return -torch.log(torch.exp(-log_prec.double()) + extra)

    # -- shared -----------------------------------------------------------------
    @torch.no_grad()
    def permute_(self, order: torch.Tensor) -> None:
        """Reorder the factors in place: new factor ``i`` is old factor ``order[i]``."""
        self._permute_own_(order)
        self.active.copy_(self.active[order])

    def _permute_own_(self, order: torch.Tensor) -> None:
        """:meth:`permute_` of everything but ``active``."""
        for tensor in self.variational_parameters():
            view = tensor.view(tensor.shape[0], self.k, self.n_values)
            view.copy_(view[:, order])
        buffers = [getattr(self, name) for name in self.factor_buffer_names]
        for tensor in self.prior_parameters() + buffers:
            tensor.copy_(tensor[order])

    def location_parameters(self) -> list[torch.nn.Parameter]:
        """The variational parameters in the entries' own units (see
        ``location_parameter_names``)."""
        return [getattr(self, name) for name in self.location_parameter_names]

    @torch.no_grad()
    def flip_(self, signs: torch.Tensor) -> None:
        """Multiply factor ``t``'s entries by ``signs[t]`` (+1 or -1, ``[k]``) in place."""
        if not self.sign_symmetric:
            raise ValueError(f"the {self.name} family is not symmetric about 0: no sign flips")
        for name in self.location_parameter_names:
            tensor = getattr(self, name)
            view = tensor.view(tensor.shape[0], self.k, self.n_values)
            view.mul_(signs.to(tensor)[None, :, None])

    def _index(self, rows) -> torch.Tensor | slice:
        if rows is None:
            return slice(None)
        return torch.as_tensor(np.asarray(rows), dtype=torch.long, device=self.active.device)

    def extra_repr(self) -> str:
        return f"m={self.m}, k={self.k}"


class PointMassFamily(PriorFamily):
    """A family with a point mass at zero (spike) and a slab::

        g = (1 - pi) delta_0 + pi g_slab
        q = (1 - alpha) delta_0 + alpha q_slab(mu, 1 / nu)

    with ``alpha = sigmoid(logits)`` per entry and ``pi = sigmoid(prior_logit)``
    per factor; the subclass names the slab's hyperparameter (second in
    ``prior_parameter_names``) and supplies the slab's maths.
    """

    row_parameter_names = ("logits", "mean", "log_prec")

    @property
    def pip(self) -> torch.Tensor:
        """Posterior inclusion probabilities ``alpha``, ``[m, k]`` (0 for a switched-off factor)."""
        return torch.sigmoid(self.logits) * self.active

    def _spike_kl(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, KL(Bernoulli(alpha) || Bernoulli(pi)))``, from logits: finite everywhere."""
        alpha = torch.sigmoid(logits)
        pl = self.prior_logit
        # log sigma(z) = -softplus(-z), log(1 - sigma(z)) = -softplus(z)
        kl = alpha * (F.softplus(-pl) - F.softplus(-logits)) + (1 - alpha) * (
            F.softplus(pl) - F.softplus(logits)
        )
        return alpha, kl

    def _spike_log_density(self, on, slab, logits) -> torch.Tensor:
        """``log q`` (or ``log g`` with the prior's logits) of draws: ``log alpha + slab``
        where ``on``, ``log(1 - alpha)`` at the point mass."""
        off = F.logsigmoid(-logits) + torch.zeros_like(slab)
        return torch.where(on, F.logsigmoid(logits) + slab, off)

    @torch.no_grad()
    def _update_spike_(self) -> torch.Tensor:
        """``pi = mean alpha`` per factor (the spike's EB update); returns ``alpha``."""
        alpha = torch.sigmoid(self.logits)
        # logit(mean alpha) = log sum alpha - log sum (1 - alpha), from the logits: finite
        # where alpha rounds to 0 or 1 everywhere
        on = torch.logsumexp(-F.softplus(-self.logits), 0)
        off = torch.logsumexp(-F.softplus(self.logits), 0)
        self.prior_logit.copy_(on - off)
        return alpha
