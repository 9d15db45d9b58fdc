"""Fitting a model: start, train, prune and rank; fitting rows with the factors fixed.

The estimator validates and converts; everything that computes with the model
lives here and speaks to the prior families and likelihoods through their
seams only (:mod:`spfa.priors.base`, :mod:`spfa.likelihoods`):

* :func:`fit_model` -- the data-driven start (:mod:`spfa.initialization`),
  training (:func:`spfa.training.train`), pruning and ranking of factors;
* :func:`fit_rows` -- ``q(L)`` (and per-sample likelihood parameters) of new
  rows with everything else held fixed, for ``transform`` and ``score``;
* :func:`build_model` -- a model from a saved state;
* :func:`fitted_attributes` -- what a fit reports.

A fit may span the ranks of a ``torch.distributed`` group (``settings.group``,
:mod:`spfa.distributed`): each rank holds its own rows, every sum over rows
that the start, the stopping rule, pruning or the reports use is summed over
ranks, and every rank takes the same decisions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ._convert import to_numpy
from ._validation import dense_rows
from .data import RowBatches
from .distributed import SINGLE, Group
from .expectation import Expectation, get_expectation
from .initialization import initialize, initialize_streamed, working_response, working_weights
from .likelihoods import Likelihood
from .linear_response import propagated_variances
from .model import SparseFactorModel
from .monitor import Monitor
from .posterior import Posterior
from .progress import ProgressBar, showing_logs
from .training import TrainResult, state_copy, train
from .views import size_grid

__all__ = [
    "FitSettings",
    "build_model",
    "fit_model",
    "fit_rows",
    "fitted_attributes",
    "row_state_keys",
    "sample_data",
]

logger = logging.getLogger(__name__)

#: Monte Carlo draws used by ``score`` and pruning (a fixed-seed, low-noise evaluation)
N_SCORE_SAMPLES = 32
#: most sampled linear-predictor entries (draws x n x p) per pruning evaluation. A fit
#: that prunes also prunes and ranks again after training on (``_train_on_after_pruning``),
#: so this is half of what one pass was given before that (2**25): at 20,000 x 2,000
#: (softplus link, batch 128) pruning took 13.6 % of the fit at 2**25 and 8.7-8.8 % here,
#: with the same factors kept and the same error
PRUNE_BUDGET = 2**24
#: most entries a pruning evaluation of a minibatch fit visits: beyond them it sees a
#: fixed random subset of the batches (the same for every evaluation: paired), its
#: rows' terms scaled to all rows. At 20,000 x 2,000 (batch 128) pruning took 13-14 %
#: of the fit with every row
PRUNE_ENTRIES = 2**23
#: most entries (rows x p) made dense at once: beyond it (or beyond one batch of rows)
#: the start is streamed over blocks of rows, and row-wise work (projections,
#: summaries) runs in chunks of it
INIT_ENTRIES = 2**24
#: the streamed start works on blocks of this fraction of a batch's rows: it holds about
#: eight float64 arrays of its block's shape at once, so its peak stays near one batch's
#: float32 data
START_BLOCK_DIVISOR = 16
#: steps in a window of the stopping rule (whole passes with several batches); the
#: training on after pruning, from a converged state, checks every half window (at half
#: the tolerance, the same improvement per step): 5,000 x 2,000 simulation, 150 -> 75
#: steps, error 0.1851 -> 0.1850, ELBO 330 nats (5e-5) lower; PBMC k = 30, 150 -> 125
#: steps, held-out unchanged
WINDOW = 50
#: steps in a stopping window of new rows' fit (transform, score) with an exact ELBO,
#: at the tolerance per step of :data:`WINDOW`; compared by that tolerance alone, a
#: short window cannot mistake the steep first steps for noise. CellTypist
#: ``transform`` of the training rows: 150 steps (50-step windows) -> 100 (25) -> 70
#: (10), its ELBO -1,059,114 -> -1,059,120 (the fit's: -1,059,089)
ROWS_WINDOW = 10
#: smallest factor on the start's L F^T tried to make a non-finite start ELBO finite
START_SHRINK_LIMIT = 1e-3


#: names of the variational parameters in log or logit coordinates: inclusion (or, for
#: the normal mixture, component) log-odds, log precisions, log variances (of every prior
#: family and of the intercept)
LOG_SCALE_NAMES = ("logits", "log_prec", "log_var")
#: their step size relative to ``learning_rate``. A step of a given length moves a
#: log precision or a log-odds far less, relative to where it must go (several units
#: from the start), than it moves a mean; on real counts this cut the steps of a fit
#: by a third at a better ELBO (issue 17 note), on the simulations it was neutral
LOG_SCALE_STEP = 4.0


@dataclass
class FitSettings:
    """How to fit: the estimator's parameters, validated."""

    n_components: int
    priors: dict  # {"loadings": name, "factors": name}
    fit_intercept: bool
    expectation: str
    n_mc_samples: int
    n_quadrature_nodes: int
    max_iter: int
    tol: float
    learning_rate: float
    batch_size: int | None
    device: torch.device
    log_dir: object = None
    verbose: int = 0
    #: the ranks the fit spans (:mod:`spfa.distributed`); one process by default
    group: Group = SINGLE

    def rule(self, n_mc_samples: int | None = None) -> Expectation:
        """The rule for ``E_q[log p]``; Monte Carlo with ``n_mc_samples`` draws."""
        n = n_mc_samples or self.n_mc_samples
        if self.expectation == "quadrature":
            n = self.n_quadrature_nodes
        return get_expectation(self.expectation, n)

    def generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        return gen

    def batches(self, X, s, likelihood: Likelihood, seed: int, covariates=None) -> RowBatches:
        """The data on the device, in batches of ``batch_size`` rows (one batch if None):
        dense blocks, or for a zero-truncated likelihood only the entries it fits. Across
        ranks, every rank splits its rows into the same number of batches, the most any
        rank needs."""
        n_batches = None
        if self.group.parallel:
            n = X.shape[0]
            own = 1 if self.batch_size is None else -(-n // min(self.batch_size, n))
            n_batches = int(self.group.max(own))

            def enough_rows():
                if n_batches > n:
                    raise ValueError(
                        f"rank {self.group.rank} holds {n} rows, fewer than the {n_batches} "
                        "batches per pass that the largest rank needs: give every rank at "
                        "least as many rows as that, or a larger batch_size"
                    )

            self.group.agree(enough_rows)  # every rank stops, none waits for the other
        return RowBatches(
            X,
            None if s is None else np.log(s),
            self.batch_size,
            entries=not likelihood.observes_zeros,
            device=self.device,
            seed=seed,
            n_batches=n_batches,
            covariates=covariates,
        )


# ---------------------------------------------------------------------- models
def new_model(n_rows: int, p: int, likelihood: Likelihood, settings: FitSettings, n_covariates=0):
    return SparseFactorModel(
        n_rows,
        p,
        settings.n_components,
        likelihood,
        fit_intercept=settings.fit_intercept,
        loadings_prior=settings.priors["loadings"],
        factors_prior=settings.priors["factors"],
        n_covariates=n_covariates,
    )


def row_state_keys(model: SparseFactorModel) -> set[str]:
    """State keys with one row per training sample (refitted for new rows, not shared)."""
    keys = {f"loadings.{name}" for name in model.loadings.row_parameter_names}
    return keys | {f"likelihood.{name}" for name in model.likelihood.row_parameters}


def global_state(model: SparseFactorModel) -> dict[str, torch.Tensor]:
    """The state shared by every row (and by every rank of a data-parallel fit): all
    but :func:`row_state_keys`."""
    local = row_state_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in local}


def build_model(
    state: dict, n_rows: int, p: int, likelihood: Likelihood, settings: FitSettings, rows=True
) -> SparseFactorModel:
    """A model with the fitted global parameters of ``state`` and ``n_rows`` rows.

    With ``rows=True`` the per-sample parameters are those of ``state`` too
    (the training rows); otherwise they are fresh, for new rows.

    Raises
    ------
    ValueError
        If ``state`` does not fit the model (missing or unexpected keys).
    """
    likelihood.initialize(np.ones(p), np.ones(p))
    effects = state.get("covariate_effects.mean")
    model = new_model(n_rows, p, likelihood, settings, 0 if effects is None else effects.shape[1])
    local = row_state_keys(model)
    state = {k: torch.as_tensor(v) for k, v in state.items() if rows or k not in local}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not set(missing) <= (set() if rows else local):
        raise ValueError(
            f"the stored model state does not fit: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return model.to(settings.device)


def fitted_likelihood(state: dict, p: int, likelihood: Likelihood, settings) -> Likelihood:
    """The fitted likelihood of ``state`` (per-feature parameters, e.g. zero inflation),
    from a model of one fresh row: no per-row state of the training rows is built."""
    return build_model(state, 1, p, likelihood, settings, rows=False).likelihood


# ----------------------------------------------------------------------- start
def _start_block(X, s, likelihood, k, rng):
    """The rows that the initial SVD sees, dense: all of them, or a random
    subset when there are more than ``INIT_ENTRIES`` entries.

    Returns ``(rows or None, x, mask, size factors of those rows)``.
    """
    n, p = X.shape
    rows = None
    if n * p > INIT_ENTRIES:
        m = min(n, max(INIT_ENTRIES // p, 2 * k + 2))
        rows = np.sort(rng.choice(n, size=m, replace=False))
    x, mask = dense_rows(X, rows)
    if not likelihood.observes_zeros:
        nonzero = x != 0 if mask is None else (x != 0) & (mask > 0)
        mask = nonzero.astype(np.float64)
    s_rows = s if s is None or rows is None else s[rows]
    return rows, x, mask, s_rows


def _row_blocks(X, s, likelihood, block_rows: int):
    """``blocks()`` for :func:`spfa.initialization.initialize_streamed`: consecutive
    blocks of ``block_rows`` rows, dense, with the zeros masked for a likelihood of
    the non-zero entries."""

    def blocks():
        n = X.shape[0]
        for a in range(0, n, block_rows):
            rows = slice(a, min(a + block_rows, n))
            x, mask = dense_rows(X, rows)
            if not likelihood.observes_zeros:
                mask = ((x != 0) & (mask is None or mask > 0)).astype(np.float64)
            yield rows, x, mask, None if s is None else s[rows]

    return blocks


def compute_start(model, X, s, settings: FitSettings, rng, start=None, covariates=None):
    """The start's point estimates (:func:`spfa.initialization.initialize`) from the
    data, or from given means ``start = (L0, F0)``; returns ``(init, rows)`` where
    ``rows`` is the subset of rows the SVD saw (None: all).

    Data of more than one block of rows (``INIT_ENTRIES`` entries, and at most
    ``batch_size`` rows in minibatch training) are started block by block
    (:func:`spfa.initialization.initialize_streamed`, blocks of
    ``1 / START_BLOCK_DIVISOR`` of a batch's rows), so that the start takes no
    more memory than training does and keeps no array of ``n`` rows. Its SVD is
    then a subspace iteration rather than the exact SVD of small data: a minibatch
    fit's start depends on whether ``batch_size < n`` (within 1 % of ``L0 F0^T``,
    tested).
    """
    likelihood = model.likelihood
    nonnegative = tuple(f.support == "nonnegative" for f in (model.loadings, model.factors))
    n, p = X.shape
    block = max(1, INIT_ENTRIES // p)
    if settings.batch_size is not None:
        block = min(block, settings.batch_size)
    group = settings.group
    if start is None and (n > block or group.parallel):
        # across ranks: the sums over rows of every pass are summed over the ranks
        init = initialize_streamed(
            _row_blocks(X, s, likelihood, max(1, block // START_BLOCK_DIVISOR)),
            int(group.sum(n)),
            p,
            settings.n_components,
            likelihood,
            settings.fit_intercept,
            rng,
            nonnegative=nonnegative,
            reduce=group.sum,
            covariates=covariates,
        )
        return init, None
    sub, x0, mask0, s0 = _start_block(X, s, likelihood, settings.n_components, rng)
    start0 = start if start is None or sub is None else (start[0][sub], start[1])
    cov0 = covariates if covariates is None or sub is None else covariates[sub]
    init = initialize(
        x0,
        mask0,
        s0,
        settings.n_components,
        likelihood,
        settings.fit_intercept,
        rng,
        start=start0,
        nonnegative=nonnegative,
        covariates=cov0,
    )
    return init, sub


def apply_start(
    model, init, sub, X, s, settings: FitSettings, start=None, shrink=1.0, covariates=None
) -> None:
    """Set ``model`` to the start, through the families' ``start_prior_`` / ``start_``
    seam; ``shrink`` scales the loadings' point estimates (and so ``L F^T``)."""
    model.loadings.start_prior_(init.loadings_scale())
    model.factors.start_prior_(init.factors)
    model.factors.start_(init.factors, init.factors_precision)
    if init.loading_blocks is not None:  # streamed: block by block
        for rows, values, precision in init.loading_blocks():
            rows = np.arange(rows.start, rows.stop)
            model.loadings.start_(shrink * values, precision, rows)
    elif sub is None:
        model.loadings.start_(shrink * init.loadings, init.loadings_precision)
    with torch.no_grad():
        for name, value in (init.intercept or {}).items():
            getattr(model.intercept, name).copy_(torch.as_tensor(value))
    if model.covariate_effects is not None:
        model.covariate_effects.start_(
            init.covariate_coef, init.covariate_precision, model.likelihood.data_unit
        )
    model.to(settings.device)
    if sub is not None:  # every row's loadings from the projection onto the start's F
        start_rows(model, X, s, None if start is None else start[0], shrink, covariates=covariates)


def start_rows(model, X, s, means=None, shrink=1.0, posterior=False, covariates=None) -> None:
    """Start ``q(L)`` of every row of ``X`` from the model's factors, in chunks of rows.

    The point estimates come from a ridge projection of the linearised data
    onto ``E[F]`` (or from ``means``, ``(n, k)``), the precisions from their
    coordinate-ascent values given ``F``. With ``posterior=True`` (new rows)
    ``q(L)`` starts at the family's normal-means posterior given them
    (``start_posterior_``). ``covariates`` (``(n, c)``) are the rows' known covariates,
    whose fitted effects are taken out of the data first.
    """
    n, p = X.shape
    chunk = max(1, INIT_ENTRIES // p)
    projection = _Projection(model)
    for a in range(0, n, chunk):
        rows = np.arange(a, min(a + chunk, n))
        x, mask = dense_rows(X, rows)
        if not model.likelihood.observes_zeros:  # the zeros are not data here
            mask = ((x != 0) & (mask is None or mask > 0)).astype(np.float64)
        s_rows = None if s is None else s[rows]
        c_rows = None if covariates is None else covariates[rows]
        values = projection.means(x, mask, s_rows, c_rows) if means is None else means[rows]
        precision = projection.precision(mask, len(rows))
        if posterior:
            # the projection is a ridge solve, already shrunk by the prior's precision tau
            # (exactly so for a diagonal Gram): undo it, so that the posterior shrinks once
            tau = projection.tau
            with np.errstate(divide="ignore", invalid="ignore"):
                raw = np.where(precision > 0, values * (precision + tau) / precision, 0.0)
            model.loadings.start_posterior_(shrink * raw, precision, rows)
        else:
            model.loadings.start_(shrink * values, precision, rows)


class _Projection:
    """The model linearised at its intercept (see :mod:`spfa.initialization`), with
    the fitted factors: what every chunk of new rows is projected with (made once).

    ``w_j`` are the working weights, ``E[F]`` the factors' means, ``tau`` the
    loadings' ridge precision, ``gram = E[F]^T W E[F] + diag(tau)``.
    """

    def __init__(self, model):
        lik = model.likelihood
        self.likelihood, self.link = lik, lik.link
        with torch.no_grad():
            b = self.b = to_numpy(model.intercept_mean())
            self.mu0 = to_numpy(lik.mean(model.intercept_mean()))
            mf, vf = model.factors.moments()
            self.mf, self.second = to_numpy(mf), to_numpy(mf**2 + vf)
            tau = to_numpy(model.loadings.prior_precision())
            effects = model.covariate_effects
            self.coef = None if effects is None else to_numpy(effects.mean)
        self.slope = lik.link.derivative(b)
        self.w = working_weights(lik, self.mu0, self.slope)
        self.tau = tau
        self.gram = (self.mf * self.w[:, None]).T @ self.mf + np.diag(tau)

    def means(self, x, mask, s, covariates=None) -> np.ndarray:
        """Ridge projection of the linearised rows ``x`` (less their covariates' fitted
        effects) onto ``E[F]``: start of ``E[L]``."""
        y = x if s is None else x / size_grid(s, self.likelihood)
        z = working_response(self.link, y, self.mu0, self.b, self.slope)
        if self.coef is not None and covariates is not None:
            z -= covariates @ self.coef.T
        if mask is not None:
            z = z * mask
        return np.linalg.solve(self.gram, ((z * self.w) @ self.mf).T).T

    def precision(self, mask, n_rows: int) -> np.ndarray:
        """``sum_j w_j E[f_jk^2]`` over each row's observed features, ``(n_rows, k)``."""
        if mask is None:
            return np.tile(self.w @ self.second, (n_rows, 1))
        return (mask * self.w) @ self.second


# -------------------------------------------------------------------- training
def _train(
    model,
    objective,
    data: RowBatches,
    settings: FitSettings,
    monitor=None,
    n_plateaus=2,
    description="fit",
    window=WINDOW,
    exact=False,
):
    """Adam over everything that requires a gradient; with several batches,
    the loadings of each batch's rows by SparseAdam (only where used), and
    ``max_iter``, the stopping rule, the history and the progress bar count passes.
    The stopping rule compares windows of ``window`` steps (whole passes with several
    batches) at ``settings.tol`` scaled to the window's length, so that it asks the same
    improvement per step of any window."""
    passes = data.n_batches
    group = settings.group
    model.sparse_rows = passes > 1
    rows = {id(p) for p in model.row_parameters()}
    local = model.row_parameters() if passes > 1 else []
    params = [p for p in model.parameters() if p.requires_grad]
    params = [p for p in params if all(p is not q for q in local)]
    shared = [p for p in params if id(p) not in rows]  # summed over the ranks
    bar = ProgressBar(settings.max_iter, description, settings.verbose if group.rank == 0 else 0)
    try:
        result = train(
            model,
            objective,
            _step_groups(model, params),
            sparse_params=_step_groups(model, local),
            n_observed=int(group.sum(data.n_observed)),
            max_iter=settings.max_iter * passes,
            check_every=_window_steps(window, passes),
            steps_per_record=passes,
            tol=settings.tol * _window_steps(window, passes) / _window_steps(WINDOW, passes),
            learning_rate=settings.learning_rate,
            on_window=monitor,
            n_plateaus=n_plateaus,
            exact=exact,
            progress=bar,
            group=group,
            shared=shared,
        )
    finally:
        model.sparse_rows = False
        bar.close()
    result.n_iter = result.n_iter // passes
    return result


def _window_steps(window: int, passes: int) -> int:
    """Steps in a stopping window of about ``window`` steps: whole passes of ``passes``
    batches each (at least one)."""
    return passes * -(-window // passes)


def _step_groups(model, params) -> list[dict]:
    """``params`` in optimiser groups, one per step size: the variational parameters in
    log or logit coordinates (:data:`LOG_SCALE_NAMES`) step :data:`LOG_SCALE_STEP` times
    further; those in ``eta``'s units (:meth:`SparseFactorModel.location_parameters`)
    step ``likelihood.data_unit`` times further, so that Adam, whose steps are in the
    parameters' own units, fits data in any units alike."""
    names = {id(p): name.rsplit(".", 1)[-1] for name, p in model.named_parameters()}
    unit = {id(p): float(model.likelihood.data_unit) for p in model.location_parameters()}
    if model.likelihood.views is not None:  # each view's factors step in that view's units
        for part, lik in zip(model.factors.parts, model.likelihood.parts, strict=True):
            unit.update({id(p): float(lik.data_unit) for p in part.location_parameters()})

    def scale(p) -> float:
        if names.get(id(p)) in LOG_SCALE_NAMES:
            return LOG_SCALE_STEP
        return unit.get(id(p), 1.0)

    # one group per step size: the fused Adam runs once per group (counts, whose unit
    # is 1, need two rather than three)
    groups: dict[float, list] = {}
    for p in params:
        groups.setdefault(scale(p), []).append(p)
    return [{"params": ps, "lr_scale": lr_scale} for lr_scale, ps in groups.items()]


@dataclass
class Fit:
    """What :func:`fit_model` returns besides the fitted model."""

    model: SparseFactorModel
    result: TrainResult
    contribution: np.ndarray  # (k,) ELBO contribution, in the final order
    order: np.ndarray  # (k,) new factor i was factor order[i] in training
    prior_history: dict
    elbo: float  # of the model returned, on the training data (pruned factors off)
    #: (n_views, k) each view's share of ``contribution`` (multi-view fits; None otherwise)
    view_contribution: np.ndarray | None = None
    #: the variance ``q(L)``'s and ``q(F)``'s components gain from the other side's
    #: uncertainty (:func:`spfa.linear_response.propagated_variances`; None: not covered)
    propagated: dict | None = None


def fit_model(X, s, likelihood, settings: FitSettings, rng, start=None, covariates=None) -> Fit:
    """Start, train, prune and rank a model of ``X`` (validated; see the estimator) with
    known ``covariates`` (``(n, c)`` or None), showing progress and log records as
    ``settings.verbose`` asks."""
    with showing_logs(settings.verbose):
        return _fit_model(X, s, likelihood, settings, rng, start, covariates)


def _fit_model(X, s, likelihood, settings: FitSettings, rng, start=None, covariates=None) -> Fit:
    n, p = X.shape
    group = settings.group
    c = 0 if covariates is None else covariates.shape[1]
    model = new_model(n, p, likelihood, settings, c)
    model.global_share = group.share
    init, sub = compute_start(model, X, s, settings, rng, start, covariates)
    apply_start(model, init, sub, X, s, settings, start, covariates=covariates)
    # the ranks' starts agree (a given start's intercept is fitted to each rank's rows):
    # every rank takes rank 0's global parameters
    group.broadcast_(global_state(model).values())
    # and the optimiser's units, which a given start sets from each rank's rows
    likelihood.data_unit = group.first(likelihood.data_unit)
    for part in getattr(likelihood, "parts", ()):  # a multi-view fit's: each view's
        part.data_unit = group.first(part.data_unit)
    # Monte Carlo draws of their own on each rank (rank 0's are one process's)
    gen = settings.generator(rng.randint(2**31 - 1) + group.rank)
    data = settings.batches(X, s, likelihood, seed=rng.randint(2**31 - 1), covariates=covariates)
    rule = settings.rule()
    whole = paired_elbo(data, model, settings, subset=False)  # every row: the start's check
    shrink = 1.0
    while not np.isfinite(whole()):
        # the linearised start overshoots where the link is steep (exp on rare
        # features): draw L F^T towards 0 until the ELBO is finite
        shrink /= 4.0
        if shrink < START_SHRINK_LIMIT:
            raise RuntimeError(_not_finite(model, "at the start, even with L F^T shrunk"))
        logger.info("non-finite ELBO at the start: loadings shrunk by %g", shrink)
        apply_start(model, init, sub, X, s, settings, start, shrink, covariates)
        group.broadcast_(global_state(model).values())

    def objective():
        return data.step_terms(model, rule, gen)

    # one TensorBoard run per fit: rank 0 writes it
    monitor = Monitor(model, settings.log_dir if group.rank == 0 else None)
    try:
        # the noise-aware rule even where the ELBO is exact: 25-step windows compared by
        # tol alone stopped earlier, and k = 30 then ended below k = 15 on the PBMCs
        result = _train(model, objective, data, settings, monitor)
        fit = _pruned_and_ranked(model, result, paired_elbo(data, model, settings), group)
        n_first = len(monitor.prior_history["step"])
        again = _train_on_after_pruning(fit, objective, data, settings, monitor)
    finally:
        monitor.close()
    if likelihood.views is not None:
        fit.view_contribution = np.full((len(likelihood.views.names), model.factors.k), np.nan)
        if not fit.result.interrupted:  # NaN: not measured
            try:
                fit.view_contribution = view_contribution(model, paired_elbo(data, model, settings))
            except KeyboardInterrupt:  # the switches were put back: the fit stands
                _interrupted(fit.result, "measuring the views' contributions (NaN)")
    if not fit.result.interrupted:  # an interrupted fit returns at once
        try:
            fit.propagated = propagated_variances(model, data, group)
        except KeyboardInterrupt:  # the pass changes nothing: the fit is kept, mean-field
            # (in a data-parallel fit the other ranks may then wait in its sums, as in
            # training: an interrupt is meant for every rank)
            _interrupted(
                fit.result,
                "widening the posteriors (spfa.linear_response), which stay mean-field",
            )
    # per-window priors were recorded in the order of their phase; report them in the final one
    for key, windows in monitor.prior_history.items():
        if key != "step":
            windows = [
                np.asarray(w)[fit.order if i < n_first else again].tolist()
                for i, w in enumerate(windows)
            ]
        fit.prior_history[key] = windows
    return fit


def _interrupted(result: TrainResult, during: str) -> None:
    """Mark ``result`` interrupted ``during`` a pass after training, keeping any earlier
    message."""
    result.interrupted = True
    earlier = f"{result.message}; " if result.message else ""
    result.message = f"{earlier}interrupted while {during}"


def _pruned_and_ranked(model: SparseFactorModel, result: TrainResult, elbo, group: Group) -> Fit:
    """The :class:`Fit` of a trained ``model``, pruned and ranked by
    :func:`prune_and_rank`. A Ctrl-C during that pass keeps the model as trained: every
    factor kept, in training order and sign, their contributions NaN (not measured), and
    the ELBO the last one training recorded (an estimate, with Monte Carlo noise where
    the ELBO has no closed form)."""
    k = model.factors.k
    if result.interrupted and not result.history["elbo"]:
        # nothing was checked: the estimator keeps its previous state, so no pass is run
        return Fit(model, result, np.full(k, np.nan), np.arange(k), {}, float("nan"))
    trained = state_copy(model)
    try:
        contribution, order, value = prune_and_rank(model, elbo, group)
    except KeyboardInterrupt:  # switched-off factors, a permutation or signs half done
        model.load_state_dict(trained)
        if not result.history["elbo"]:  # nothing was checked: the estimator keeps its state
            raise
        _interrupted(result, "pruning and ranking the factors, which are kept as trained")
        return Fit(model, result, np.full(k, np.nan), np.arange(k), {}, result.history["elbo"][-1])
    return Fit(model, result, contribution, order, {}, value)


def _train_on_after_pruning(fit: Fit, objective, data, settings, monitor) -> np.ndarray:
    """The kept factors were fitted beside the pruned ones: train on without them, to the
    next plateau and within what ``max_iter`` leaves, then prune and rank again, and keep
    the better of the two states (PBMC, k = 30: 14 factors pruned, ELBO -326,930 before,
    -326,770 after 125 steps, above k = 15's -326,853). Updates ``fit`` in place; returns the
    permutation of the second ranking (the identity if there was none)."""
    model, result = fit.model, fit.result
    identity = np.arange(len(fit.order))
    left = settings.max_iter - result.n_iter
    if result.interrupted or bool(model.factors.active.all()) or left <= 0:
        return identity
    n_first = len(monitor.prior_history["step"])
    monitor.offset = len(result.history["elbo"])
    pruned = state_copy(model)
    within = dataclasses.replace(settings, max_iter=left)
    refit = _train(
        model, objective, data, within, monitor, 1, description="refit", window=WINDOW // 2
    )

    def keep_pruned() -> np.ndarray:  # the first pruned fit and its record stand
        model.load_state_dict(pruned)
        for windows in monitor.prior_history.values():
            del windows[n_first:]
        return identity

    try:
        contribution, again, elbo = prune_and_rank(
            model, paired_elbo(data, model, settings), settings.group
        )
    except KeyboardInterrupt:  # as when training on ends lower
        _interrupted(result, "pruning again after training on; the first pruned fit was kept")
        return keep_pruned()
    if elbo >= fit.elbo:
        fit.contribution, fit.elbo, fit.order = contribution, elbo, fit.order[again]
        fit.result = result.followed_by(refit)
        return again
    # no better (a sparse simulation: 0.8 nats lower): the pruned fit stands
    logger.info("training on after pruning ended lower; kept the pruned fit")
    result.interrupted, result.message = refit.interrupted, refit.message
    return keep_pruned()


def fit_rows(state, X, s, likelihood, settings: FitSettings, rng, covariates=None):
    """Fit ``q(L)`` of new rows (with their known ``covariates``) with the factors,
    covariate effects, priors and nuisance held fixed.

    Returns ``(model, data, result)``.
    """
    model = build_model(state, X.shape[0], X.shape[1], likelihood, settings, rows=False)
    start_rows(model, X, s, posterior=True, covariates=covariates)
    model.requires_grad_(False)
    # the new rows' own parameters: q(L) and any per-sample likelihood parameters
    for prm in model.row_parameters():
        prm.requires_grad_(True)
    gen = settings.generator(rng.randint(2**31 - 1))
    data = settings.batches(X, s, likelihood, seed=rng.randint(2**31 - 1), covariates=covariates)
    rule = settings.rule()

    def objective():
        return data.step_terms(model, rule, gen)

    # with an exact ELBO the rows' fit ends at its first plateau: the smaller steps
    # after it settle Monte Carlo jitter, which it does not have (CellTypist: score
    # 0.7 nats lower of 1,059,281, 0.53 s rather than 0.69 s)
    exact = likelihood.closed_form or settings.expectation == "quadrature"
    with model.fixed_globals(), showing_logs(settings.verbose):
        result = _train(
            model,
            objective,
            data,
            settings,
            n_plateaus=1 if exact else 2,
            description="transform",
            window=ROWS_WINDOW if exact else WINDOW,
            exact=exact,
        )
    if result.interrupted:  # new rows' loadings are not kept: there is nowhere to keep them
        raise KeyboardInterrupt(
            f"interrupted at step {result.n_iter} of fitting the new rows' loadings, which "
            "were not kept"
        )
    return model, data, result


def rows_posterior(model, data: RowBatches, widen: bool = True) -> Posterior:
    """The loadings' posterior of the rows of :func:`fit_rows`, widened for the factors'
    uncertainty (:mod:`spfa.linear_response`) if ``widen``: as the training rows were, so
    that new rows and training rows are summarised alike."""
    if not widen:
        return model.loadings.posterior()
    return model.loadings.posterior(propagated_variances(model, data, factors=False)["loadings"])


def score_rows(model, data: RowBatches, settings: FitSettings) -> float:
    """ELBO per observed entry with ``N_SCORE_SAMPLES`` fixed-seed draws."""
    with torch.no_grad():
        terms = data.total_terms(model, settings.rule(N_SCORE_SAMPLES), settings.generator(0))
    return float(terms.elbo) / data.n_observed


def _not_finite(model, when: str) -> str:
    """The message of a fit whose ELBO is not finite, naming what overflowed."""
    with torch.no_grad():
        rows = torch.arange(min(model.loadings.m, 4096), device=model.factors.active.device)
        mean, var = model.eta_moments(rows=rows)
    link = model.likelihood.link.name
    if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):
        return (
            f"the ELBO is not finite {when}: the moments of eta are NaN or infinite (a "
            "row or feature with nothing observed, or parameters that diverged)"
        )
    advice = " Use link='softplus' (linear growth)." if link == "exp" else ""
    return (
        f"the ELBO is not finite {when}: E[eta] reaches {float(mean.max()):.3g} with "
        f"variance up to {float(var.max()):.3g}, where the {link!r} link's mean "
        f"overflows float32.{advice} Check the data for extreme values"
    )


# ------------------------------------------------------------ prune and rank
def paired_elbo(data: RowBatches, model, settings: FitSettings, subset: bool = True):
    """A function evaluating the ELBO with common random numbers (fixed seed).

    Differences of its values between two settings of ``active`` are paired
    comparisons, free of most Monte Carlo noise (quadrature has none). A
    minibatch fit of more than ``PRUNE_ENTRIES`` entries is evaluated on a fixed
    random subset of its batches, scaled to all rows, unless ``subset=False``.
    """
    group = settings.group
    used = data.n_batches  # the same on every rank
    n_evaluated = float(group.sum(data.n_evaluated))  # over every rank: one decision
    if subset and data.n_batches > 1:  # minibatches: a fixed random subset beyond the budget
        per_batch = n_evaluated / data.n_batches
        used = int(min(data.n_batches, max(1, PRUNE_ENTRIES // per_batch)))
    evaluated = n_evaluated * used / data.n_batches
    rule = settings.rule(max(1, min(N_SCORE_SAMPLES, int(PRUNE_BUDGET // evaluated))))

    def elbo(by_view: bool = False):
        """The ELBO; ``by_view``: a multi-view fit's per view, ``(n_views,)``, each
        view's expected log-likelihood less its factors' KL."""
        with torch.no_grad():
            terms = data.total_terms(model, rule, settings.generator(0), used)
            if by_view:
                kl = model.factors.kl_by_view() * model.global_share
                return np.asarray(group.sum(to_numpy(terms.err_by_view - kl)), dtype=float)
        return float(group.sum(float(terms.elbo)))

    return elbo


def _switch(model: SparseFactorModel, k: int, on: bool) -> None:
    for side in (model.loadings, model.factors):
        side.active[k] = 1.0 if on else 0.0


@contextlib.contextmanager
def _switches_restored_on_interrupt(model: SparseFactorModel):
    """Factors switched off and on while the ELBO is compared: a Ctrl-C in between puts
    every factor back as it was before, so that the model is still the trained one."""
    saved = [side.active.clone() for side in (model.loadings, model.factors)]
    try:
        yield
    except KeyboardInterrupt:
        for side, active in zip((model.loadings, model.factors), saved, strict=True):
            side.active.copy_(active)
        raise


def prune_and_rank(
    model: SparseFactorModel, elbo, group: Group = SINGLE
) -> tuple[np.ndarray, np.ndarray, float]:
    """Switch off the factors the data do not support; order the rest by ELBO contribution.

    *Pruning.* A factor the data do not support ends training with a
    posterior close to its prior and a tiny slab scale; its prior is then not
    identified and its summaries are meaningless. Empirical Bayes takes the
    boundary where the prior is the point mass at zero wherever the ELBO there
    is at least as high. Factors are tried from the smallest
    ``||E[l_k]|| ||E[f_k]||`` up; the ELBO is evaluated with common random
    numbers, so each comparison is paired.

    *Ranking.* The contribution of factor ``k`` is ``ELBO - ELBO(without
    k)`` with the other kept factors as fitted (paired draws); 0 for a
    pruned factor. A factor tried after the last pruned one was tried in
    exactly that state, so its trial is reused; only the factors tried
    before a later pruning are evaluated again. Typically the pruned
    factors are the smallest and are tried first, and the whole selection
    costs ``k + 1`` evaluations of the ELBO rather than ``2k + 1``.

    The model is permuted in place (kept factors by decreasing
    contribution, pruned ones last); returns the contributions in the new
    order and the permutation (new factor ``i`` was factor ``order[i]`` in
    training). Across ranks, ``elbo`` and the loadings' norms are summed over the
    ranks (``group``), so every rank decides alike. A ``KeyboardInterrupt`` leaves the
    model part way (see :func:`_pruned_and_ranked`, which restores it).
    """
    with torch.no_grad():
        l_norm = model.loadings.moments().mean.norm(dim=0)
        if group.parallel:  # over every rank's rows
            l_norm = torch.as_tensor(np.sqrt(group.sum(to_numpy(l_norm**2)))).to(l_norm)
        size = l_norm * model.factors.moments().mean.norm(dim=0)
    tried = torch.argsort(size).tolist()
    best = elbo()
    if not np.isfinite(best):
        raise RuntimeError(_not_finite(model, "after training"))
    without: dict[int, float] = {}
    last_pruned = -1
    for position, k in enumerate(tried):
        _switch(model, k, False)
        trial = elbo()
        if np.isfinite(trial) and trial >= best:
            best, last_pruned = trial, position
            logger.info("pruned factor %d: the ELBO is no lower without it", k)
        else:
            _switch(model, k, True)
            without[k] = trial
    # `best` is the ELBO of the kept factors, with the same draws
    contribution = np.zeros(len(tried))
    for position, k in enumerate(tried):
        if k not in without:
            continue
        if position < last_pruned:  # tried while a later-pruned factor was still on
            _switch(model, k, False)
            without[k] = elbo()
            _switch(model, k, True)
        contribution[k] = best - without[k]
    active = model.factors.active.cpu().numpy() > 0
    order = np.lexsort((-contribution, ~active))
    index = torch.as_tensor(order, device=model.factors.active.device)
    model.loadings.permute_(index)
    model.factors.permute_(index)
    orient_(model)
    return contribution[order], order, best


def view_contribution(model: SparseFactorModel, elbo) -> np.ndarray:
    """A multi-view fit's ELBO contribution of each kept factor in each view,
    ``(n_views, k)``: what the view's expected log-likelihood less its factors' KL loses
    without the factor (paired draws, as in :func:`prune_and_rank`); 0 for a pruned
    factor. A factor that lives in one view contributes little to the others. The
    views' contributions add up to ``elbo_contribution_`` less the factor's loadings' KL,
    which the views share."""
    base = elbo(by_view=True)
    out = np.zeros((base.size, model.factors.k))
    with _switches_restored_on_interrupt(model):
        for k in np.flatnonzero(model.factors.active.cpu().numpy() > 0):
            _switch(model, k, False)
            out[:, k] = base - elbo(by_view=True)
            _switch(model, k, True)
    return out


def orient_(model: SparseFactorModel) -> None:
    """The sign convention: each factor's entry of largest ``|E[F]|`` is positive.

    ``L F^T`` is unchanged when a factor's loadings and factors are negated together,
    and so is the ELBO under priors symmetric about 0 (point-normal, normal mixture); the
    fit's sign is then arbitrary, and this makes each factor read as the genes it raises
    and the cells that use it. Families without that symmetry keep their sign.
    """
    if not (model.loadings.sign_symmetric and model.factors.sign_symmetric):
        return
    mean = model.factors.posterior().mean  # (p, k)
    top = np.abs(mean).argmax(axis=0)
    signs = np.where(mean[top, np.arange(mean.shape[1])] < 0, -1.0, 1.0)
    if (signs < 0).any():
        flips = torch.as_tensor(signs, device=model.factors.active.device)
        model.loadings.flip_(flips)
        model.factors.flip_(flips)


# ------------------------------------------------------------------ reporting
def fitted_attributes(model: SparseFactorModel, propagated: dict | None = None) -> dict:
    """The fitted ``*_`` attributes a model gives the estimator (numpy), its posterior
    summaries widened by ``propagated`` (see :class:`Fit`)."""
    out = {}
    for side in ("loadings", "factors"):
        family = getattr(model, side)
        extra = None if propagated is None else propagated[side]
        post = family.posterior(extra)
        out[f"{side}_propagated_var_"] = extra
        out[f"{side}_pip_"], out[f"{side}_sd_"], out[f"{side}_lfsr_"] = (
            post.pip,
            post.sd,
            post.lfsr,
        )
        out[f"{side}_mean_"] = post.mean
        with torch.no_grad():
            for key, value in family.prior_summary().items():
                out[f"{side}_{key}_"] = to_numpy(value)
    out["loadings_"] = out.pop("loadings_mean_")
    out["components_"] = out.pop("factors_mean_").T.copy()
    with torch.no_grad():
        out["intercept_"] = to_numpy(model.intercept_mean())
        if model.intercept is not None:
            out["intercept_prior_mean_"] = float(model.intercept.prior_mean)
            out["intercept_prior_scale_"] = float(model.intercept.prior_scale)
    out.update(model.likelihood.fitted_attributes())
    if model.covariate_effects is not None:
        with torch.no_grad():
            moments = model.covariate_effects.moments()
            out["covariate_coef_"] = to_numpy(moments.mean)
            out["covariate_coef_sd_"] = to_numpy(moments.var.sqrt())
            out["covariate_prior_scale_"] = to_numpy(model.covariate_effects.prior_scale)
    out["active_components_"] = model.factors.active.cpu().numpy() > 0
    out["n_effective_components_"] = int(out["active_components_"].sum())
    return out


def fit_attributes(fit: Fit, X, group: Group = SINGLE) -> dict:
    """Every fitted ``*_`` attribute of a :class:`Fit` of ``X``: the model's
    (:func:`fitted_attributes`), its state, the training record and, for a
    likelihood without a positive mean (Gaussian), ``explained_variance_ratio_``
    (over every rank's rows of a data-parallel fit)."""
    out = fitted_attributes(fit.model, fit.propagated)
    out["state_dict_"] = {k: v.detach().cpu().clone() for k, v in fit.model.state_dict().items()}
    out["elbo_contribution_"] = fit.contribution
    views = fit.model.likelihood.views
    if views is not None:
        out["view_elbo_contribution_"] = fit.view_contribution
        out["view_names_"] = np.asarray(views.names, dtype=str)
        out["feature_groups_"] = views.groups
    out["n_iter_"] = fit.result.n_iter
    out["n_rollbacks_"] = fit.result.n_rollbacks
    out["history_"] = {**fit.result.history, **fit.prior_history}
    if not fit.model.likelihood.positive_mean:
        try:
            out["explained_variance_ratio_"] = explained_variance_ratio(
                X, out["loadings_"], out["components_"], group
            )
        except KeyboardInterrupt:  # a pass over the data: the fit stands without it
            out["explained_variance_ratio_"] = np.full(fit.model.factors.k, np.nan)
            _interrupted(fit.result, "measuring explained_variance_ratio_ (NaN)")
    out["elbo_"] = float(fit.elbo)
    return out


def explained_variance_ratio(
    X, loadings: np.ndarray, components: np.ndarray, group: Group = SINGLE
) -> np.ndarray:
    """Gaussian: share of the observed variance of each feature-centred factor term.

    With ``o`` the observed entries, ``count_j``, ``A = o^T l`` and
    ``B = o^T l^2``, the centred term ``l_k f_k^T`` has observed sum of squares
    ``sum_j f_jk^2 (B_jk - A_jk^2 / count_j)``; every sum is accumulated over
    chunks of rows, so no ``n x p`` array is formed.
    """
    n, p = X.shape
    k = loadings.shape[1]
    count, s1, s2 = np.zeros(p), np.zeros(p), np.zeros(p)
    a_sum, b_sum = np.zeros((p, k)), np.zeros((p, k))
    chunk = max(1, INIT_ENTRIES // p)
    for a in range(0, n, chunk):
        rows = np.arange(a, min(a + chunk, n))
        x, mask = dense_rows(X, rows)
        obs = np.ones_like(x) if mask is None else mask
        lo = loadings[rows]
        count += obs.sum(0)
        s1 += x.sum(0)
        s2 += (x**2).sum(0)
        a_sum += obs.T @ lo
        b_sum += obs.T @ lo**2
    count, s1, s2, a_sum, b_sum = group.sum(count, s1, s2, a_sum, b_sum)  # over the ranks
    count = np.maximum(count, 1.0)
    total = float((s2 - s1**2 / count).sum())
    if total <= 0:  # constant features: nothing to explain
        return np.zeros(k)
    explained = ((b_sum - a_sum**2 / count[:, None]) * components.T**2).sum(0)
    return explained / total


def sample_data(model, s, n_draws: int, n_features: int, rng, covariates=None) -> np.ndarray:
    """Posterior predictive data sets of the model's rows, ``(n_draws, n, p)``.

    Each draw takes ``L``, ``F`` and ``b`` jointly from ``q``, then data from
    the likelihood at ``s h(L F^T + b)`` with the fitted nuisance parameters.
    """
    n = model.loadings.m
    gen = torch.Generator(device=model.factors.active.device)
    gen.manual_seed(int(rng.randint(2**31 - 1)))
    data_rng = np.random.default_rng(rng.randint(2**31 - 1))
    out = np.empty((n_draws, n, n_features))
    if covariates is not None:
        covariates = torch.as_tensor(covariates, device=model.factors.active.device)
    with torch.no_grad():
        for d in range(n_draws):
            eta = model.sample_eta(gen, covariates=covariates)
            mean = to_numpy(model.likelihood.mean(eta))
            if s is not None:
                mean = mean * size_grid(s, model.likelihood)
            out[d] = model.likelihood.sample(mean, data_rng)
    return out
