"""spfa on AnnData, following scanpy's conventions (the optional extra ``spfa-vi[anndata]``).

:func:`fit` fits :class:`~spfa.SparseFactorAnalysis` to ``adata.X`` (or a layer),
on all genes or those of ``mask_var``, and writes, with ``key_added="spfa"``:

=================================  ==========  ==========================================
``adata.obsm["X_spfa"]``           ``(n, k)``  posterior mean loadings ``E[L]`` of the cells
``adata.varm["spfa_factors"]``     ``(p, k)``  posterior mean factors ``E[F]`` (zero rows
                                               for genes outside ``mask_var``)
``adata.varm["spfa_pip"]``         ``(p, k)``  posterior inclusion probabilities of ``F``
``adata.var["spfa_intercept"]``    ``(p,)``    the genes' intercepts ``E[b]`` (NaN outside)
``adata.varm["spfa_covariates"]``  ``(p, c)``  the covariates' effects ``E[B]`` (with
                                               ``covariates=``; zero rows outside)
``adata.uns["spfa"]``              dict        ``params``, ``elbo`` (the curve, one value
                                               per record), ``elbo_contribution`` and
                                               ``active`` per factor,
                                               ``n_effective_components``, ``layer``,
                                               ``mask_var``, ``covariates`` (the design's
                                               column names); for a multi-view fit
                                               (``feature_groups=``) also ``views`` and
                                               ``view_elbo_contribution``; for a fit
                                               stopped by Ctrl-C, ``interrupted`` (where)
=================================  ==========  ==========================================

Factors keep the estimator's order: by ELBO contribution, pruned ones last
(``uns["spfa"]["active"]`` is False for them). A backed AnnData (``backed="r"``)
stays on disk: its ``X`` is read as :class:`spfa.backed.BackedRows`, a block of rows
at a time (with ``batch_size``, one minibatch per step), never whole.

Size factors are the estimator's default unless given: each cell's total count over
the fitted genes, over the mean. ``covariates=["batch", ...]`` names columns of
``adata.obs`` (:func:`covariate_design`): a categorical, text or boolean column is
one-hot encoded over its levels (design columns ``"batch=A"``, ...), a numeric one
enters as it is; the factors then describe the variation beyond them. New cells
(:func:`transform`) are matched to the fitted genes by name, so their AnnData may hold
other genes, in any order.
"""

from __future__ import annotations

import warnings

import numpy as np

from .backed import BackedRows, is_backed
from .estimator import SparseFactorAnalysis
from .io import read_rows

__all__ = ["FitInterrupted", "counts", "covariate_design", "fit", "layer_matrix", "transform"]


class FitInterrupted(KeyboardInterrupt):
    """A Ctrl-C that stopped :func:`fit` once training had a state to keep.

    ``adata`` holds that fit, as it would a finished one, and
    ``uns[key_added]["interrupted"]`` says where it stopped.

    Parameters
    ----------
    where : str
        Where the fit stopped and what it kept.
    estimator : SparseFactorAnalysis
        The estimator, holding the fit.

    Attributes
    ----------
    where : str
    estimator : SparseFactorAnalysis
    """

    def __init__(self, where: str, estimator: SparseFactorAnalysis):
        super().__init__(f"{where}; adata holds that fit")
        self.where, self.estimator = where, estimator

    def __reduce__(self):
        return type(self), (self.where, self.estimator)


def layer_matrix(adata, layer=None):
    """``adata.X``, or ``adata.layers[layer]``; a ValueError names a missing layer."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty; pass layer= to fit one of adata.layers")
        return adata.X
    if layer not in adata.layers:
        raise ValueError(
            f"adata has no layer {layer!r}; its layers are {sorted(adata.layers.keys())}"
        )
    return adata.layers[layer]


def _gene_mask(adata, mask_var) -> np.ndarray:
    """``mask_var`` (None, a boolean column of ``adata.var``, or a boolean array) as a
    boolean mask of ``adata``'s genes."""
    p = adata.n_vars
    if mask_var is None:
        return np.ones(p, dtype=bool)
    if isinstance(mask_var, str):
        if mask_var not in adata.var.columns:
            raise ValueError(
                f"mask_var={mask_var!r} is not a column of adata.var (its columns: "
                f"{list(adata.var.columns)}); scanpy's highly_variable_genes writes "
                "'highly_variable'"
            )
        mask = adata.var[mask_var].to_numpy()
        name = f"adata.var[{mask_var!r}]"
    else:
        mask = np.asarray(mask_var)
        name = "mask_var"
    if mask.dtype != bool:
        raise ValueError(f"{name} must be boolean; it has dtype {mask.dtype}")
    if mask.shape != (p,):
        raise ValueError(f"{name} has shape {mask.shape}; adata has {p} genes")
    if not mask.any():
        raise ValueError(f"{name} selects no genes")
    return mask


def _size_factors(adata, size_factors):
    if isinstance(size_factors, str):
        if size_factors not in adata.obs.columns:
            raise ValueError(f"size_factors={size_factors!r} is not a column of adata.obs")
        return adata.obs[size_factors].to_numpy(dtype=float)
    return size_factors


def covariate_design(adata, columns, *, names=None) -> tuple[np.ndarray, list[str]]:
    """The ``adata.obs`` columns ``columns`` as a numeric design ``(n_obs, c)``.

    A categorical, text or boolean column becomes one indicator per level (named
    ``"column=level"``); a numeric column enters as it is (named ``"column"``).

    Parameters
    ----------
    adata : anndata.AnnData
    columns : str or list of str
        Columns of ``adata.obs``.
    names : list of str, optional
        The design column names of a fit (its ``covariate_names_``): new cells are
        encoded over the fit's levels, and a level the fit never saw is a ValueError.

    Returns
    -------
    design : ndarray of shape (n_obs, c)
    names : list of str
    """
    import pandas as pd  # a dependency of anndata

    columns = [columns] if isinstance(columns, str) else list(columns)
    if not columns:
        raise ValueError("covariates names no adata.obs column")
    blocks, out = [], []
    for column in columns:
        if column not in adata.obs.columns:
            raise ValueError(
                f"covariate {column!r} is not a column of adata.obs (its columns: "
                f"{list(adata.obs.columns)})"
            )
        series = adata.obs[column]
        if series.isna().any():
            raise ValueError(f"adata.obs[{column!r}] has missing values")
        numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
        if numeric:
            blocks.append(series.to_numpy(dtype=np.float64)[:, None])
            out.append(column)
            continue
        values = series.astype(str).to_numpy()
        if names is None:
            cat = series.astype("category").cat.categories
            levels = [str(level) for level in cat]
        else:
            prefix = f"{column}="
            levels = [name[len(prefix) :] for name in names if name.startswith(prefix)]
            unseen = sorted(set(values) - set(levels))
            if unseen:
                raise ValueError(
                    f"adata.obs[{column!r}] has levels the fit never saw: {unseen[:5]}; "
                    f"the fit's levels are {levels}"
                )
        blocks.append((values[:, None] == np.asarray(levels, dtype=object)[None, :]).astype(float))
        out.extend(f"{column}={level}" for level in levels)
    return np.hstack(blocks), out


def _json_safe(params: dict) -> dict:
    """The estimator's parameters as AnnData can write them: None dropped, others as text."""
    out = {}
    for name, value in params.items():
        if value is None:
            continue
        if isinstance(value, (bool, int, float, str, np.integer, np.floating)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def counts(adata, *, layer: str | None = None, mask_var=None):
    """The matrix :func:`fit` fits and the mask of its genes.

    Parameters
    ----------
    adata, layer, mask_var :
        As in :func:`fit`.

    Returns
    -------
    X : ndarray, scipy.sparse.csr_matrix or BackedRows of shape (n_obs, n_genes_fitted)
        Rows on disk (:class:`spfa.backed.BackedRows`) when ``adata`` is backed.
    mask : ndarray of bool of shape (n_vars,)
    """
    mask = _gene_mask(adata, mask_var)
    X = _rows(layer_matrix(adata, layer), None if mask.all() else np.flatnonzero(mask))
    return X, mask


def _rows(matrix, columns):
    """``matrix[:, columns]``: left on disk when it is there, else in memory."""
    if is_backed(matrix):
        return BackedRows(matrix, columns=columns)
    return read_rows(matrix, columns)


def fit(
    adata,
    n_components: int = 30,
    *,
    layer: str | None = None,
    mask_var=None,
    size_factors=None,
    covariates=None,
    feature_groups=None,
    key_added: str = "spfa",
    verbose=True,
    **params,
) -> SparseFactorAnalysis:
    """Fit sparse factor analysis to the counts of ``adata`` and write the results into it.

    Parameters
    ----------
    adata : anndata.AnnData
        Cells x genes, in memory or backed (``backed="r"``).
    n_components : int, default=30
    layer : str, optional
        Fit ``adata.layers[layer]`` rather than ``adata.X``.
    mask_var : str or ndarray of bool of shape (n_vars,), optional
        The genes to fit: a boolean column of ``adata.var`` (e.g.
        ``"highly_variable"``) or a mask; None fits all.
    size_factors : ndarray of shape (n_obs,) or str, optional
        Per-cell size factors, or a column of ``adata.obs`` holding them; None:
        library sizes over the fitted genes (the estimator's default).
    covariates : str or list of str, optional
        Columns of ``adata.obs`` whose effects the model learns beside the factors
        (:func:`covariate_design`), e.g. ``"batch"``.
    feature_groups : str or array-like of shape (n_vars,), optional
        Each gene's view for a multi-view fit (``likelihood={view: name, ...}``): a
        column of ``adata.var`` (e.g. ``"feature_types"``, as 10x and muon name RNA
        and antibody capture) or the views themselves. ``uns[key_added]`` then also
        holds ``views`` and ``view_elbo_contribution`` (``(n_views, k)``). The fitted
        genes are read into memory (a multi-view fit does not stream from disk).
    key_added : str, default="spfa"
        Write ``obsm[f"X_{key_added}"]``, ``varm[f"{key_added}_factors"]``,
        ``varm[f"{key_added}_pip"]``, ``var[f"{key_added}_intercept"]`` and
        ``uns[key_added]`` (see the module docstring).
    verbose : bool or {0, 1, 2}, default=True
        A progress bar and spfa's log records on stderr (:mod:`spfa.progress`).
    **params
        Any other :class:`~spfa.SparseFactorAnalysis` parameter.

    Returns
    -------
    SparseFactorAnalysis
        The fitted estimator; its ``feature_names_in_`` are the fitted genes' names.

    Raises
    ------
    FitInterrupted
        On Ctrl-C once training has a state to keep: ``adata`` then holds that fit, and
        the exception's ``estimator`` is it (a KeyboardInterrupt, so it still stops the
        caller). A Ctrl-C before that leaves ``adata`` unchanged.
    """
    X, mask = counts(adata, layer=layer, mask_var=mask_var)
    design, names = (None, []) if covariates is None else covariate_design(adata, covariates)
    groups = None
    if feature_groups is not None:
        if isinstance(feature_groups, str):
            if feature_groups not in adata.var:
                raise ValueError(
                    f"adata.var has no column {feature_groups!r} for feature_groups; its "
                    f"columns are {list(adata.var.columns)}"
                )
            feature_groups = adata.var[feature_groups]
        groups = np.asarray(feature_groups).astype(str)
        if groups.shape != (adata.n_vars,):
            raise ValueError(
                f"feature_groups must name one view per gene of adata ({adata.n_vars}), got "
                f"shape {groups.shape}"
            )
        groups = groups[mask]
        if isinstance(X, BackedRows):  # a multi-view fit holds its rows in memory
            X = X.read(0, X.shape[0])
    estimator = SparseFactorAnalysis(n_components=n_components, verbose=verbose, **params)
    interrupted = None
    try:
        estimator.fit(
            X,
            size_factors=_size_factors(adata, size_factors),
            covariates=design,
            **({} if groups is None else {"feature_groups": groups}),
        )
    except KeyboardInterrupt as err:
        if not hasattr(estimator, "n_features_in_"):  # stopped before any state was kept
            raise
        # the estimator holds the fit so far: written below
        interrupted = str(err).removesuffix("; the estimator holds that fit")
    estimator.feature_names_in_ = np.asarray(adata.var_names[mask], dtype=object)
    if design is not None:
        columns = [covariates] if isinstance(covariates, str) else list(covariates)
        estimator.covariate_columns_ = np.asarray(columns, dtype=object)
        estimator.covariate_names_ = np.asarray(names, dtype=object)
        effects = np.zeros((adata.n_vars, len(names)))
        effects[mask] = estimator.covariate_coef_
        adata.varm[f"{key_added}_covariates"] = effects

    k = estimator.n_components
    factors = np.zeros((adata.n_vars, k))
    pip = np.zeros((adata.n_vars, k))
    factors[mask], pip[mask] = estimator.components_.T, estimator.factors_pip_
    adata.obsm[f"X_{key_added}"] = np.asarray(estimator.loadings_)
    adata.varm[f"{key_added}_factors"] = factors
    adata.varm[f"{key_added}_pip"] = pip
    intercept = np.full(adata.n_vars, np.nan)
    intercept[mask] = estimator.intercept_
    adata.var[f"{key_added}_intercept"] = intercept
    adata.uns[key_added] = {
        "params": _json_safe(estimator.get_params()),
        "elbo": np.asarray(estimator.history_["elbo"], dtype=float),
        "elbo_contribution": np.asarray(estimator.elbo_contribution_, dtype=float),
        "active": np.asarray(estimator.active_components_, dtype=bool),
        "n_effective_components": int(estimator.n_effective_components_),
        "layer": "X" if layer is None else layer,
        "mask_var": mask_var if isinstance(mask_var, str) else ("" if mask_var is None else "mask"),
        "covariates": list(names),
    }
    if groups is not None:
        adata.uns[key_added]["views"] = [str(v) for v in estimator.view_names_]
        adata.uns[key_added]["view_elbo_contribution"] = np.asarray(
            estimator.view_elbo_contribution_, dtype=float
        )
    if interrupted is not None:
        adata.uns[key_added]["interrupted"] = interrupted
        raise FitInterrupted(interrupted, estimator)
    return estimator


def _columns(adata, estimator) -> np.ndarray:
    """Positions in ``adata.var_names`` of the estimator's genes, in its order."""
    names = getattr(estimator, "feature_names_in_", None)
    if names is None:
        if adata.n_vars != estimator.n_features_in_:
            raise ValueError(
                f"adata has {adata.n_vars} genes; the estimator was fitted to "
                f"{estimator.n_features_in_} unnamed features"
            )
        return np.arange(adata.n_vars)
    index = adata.var_names.get_indexer(np.asarray(names, dtype=str))
    if (index < 0).any():
        absent = np.asarray(names)[index < 0]
        raise ValueError(
            f"{absent.size} of the estimator's {len(names)} genes are not in adata.var_names "
            f"(e.g. {', '.join(map(str, absent[:5]))})"
        )
    return index


def _design_of(adata, estimator):
    """New cells' covariates for a fit by :func:`fit` (None for a fit without)."""
    columns = getattr(estimator, "covariate_columns_", None)
    if columns is None:
        return None
    names = [str(name) for name in estimator.covariate_names_]
    return covariate_design(adata, [str(c) for c in columns], names=names)[0]


def transform(
    adata,
    estimator: SparseFactorAnalysis,
    *,
    layer: str | None = None,
    size_factors=None,
    key_added: str = "spfa",
) -> np.ndarray:
    """Fit the loadings of ``adata``'s cells with the estimator's factors held fixed,
    and write them to ``adata.obsm[f"X_{key_added}"]``.

    Parameters
    ----------
    adata : anndata.AnnData
        New cells; the estimator's genes are looked up by name in ``adata.var_names``.
    estimator : SparseFactorAnalysis
        Fitted (by :func:`fit`, or on arrays with the same genes in the same order).
    layer, size_factors, key_added :
        As in :func:`fit`; size factors default to library sizes on the training scale.
        The covariates of a fit with them are read from the same ``adata.obs``
        columns, encoded over the fit's levels.

    Returns
    -------
    ndarray of shape (n_obs, n_components)
        ``E[L]`` of the new cells.
    """
    columns = _columns(adata, estimator)
    whole = np.array_equal(columns, np.arange(adata.n_vars))
    X = _rows(layer_matrix(adata, layer), None if whole else columns)
    if isinstance(X, BackedRows) and getattr(estimator, "feature_groups_", None) is not None:
        X = X.read(0, X.shape[0])  # a multi-view fit holds its rows in memory
    with warnings.catch_warnings():
        # the genes were matched by name above; the array itself carries none
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        loadings = estimator.transform(
            X,
            size_factors=_size_factors(adata, size_factors),
            covariates=_design_of(adata, estimator),
        )
    adata.obsm[f"X_{key_added}"] = loadings
    return loadings
