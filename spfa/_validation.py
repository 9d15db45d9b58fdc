"""Input checks shared by the estimator's methods. Every problem is a ValueError
that names it."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils.validation import validate_data

from .backed import BackedRows, as_backed_rows, is_backed

__all__ = [
    "INTEGER_TOLERANCE",
    "NonIntegerCountsWarning",
    "SizeFactorsWarning",
    "check_count_values",
    "check_data",
    "check_values",
    "dense_rows",
    "check_size_factors",
    "resolve_device",
    "check_positive_int",
    "check_positive_float",
    "check_covariates",
    "check_start",
    "clear_fitted",
    "warn_missing_size_factors",
]


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive_float(
    value, name: str, allow_zero: bool = False, maximum: float | None = None
) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    ok = ok and (maximum is None or value <= maximum)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        bound += "" if maximum is None else f" and <= {maximum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


#: values checked at a time, so that validation's temporaries stay small
_CHUNK = 2**22


#: the largest count float32 holds exactly (2^24)
MAX_COUNT = 2**24

#: a value this close to an integer is that integer (exports of counts carry float noise)
INTEGER_TOLERANCE = 1e-6


class NonIntegerCountsWarning(UserWarning):
    """Count likelihoods were given non-negative data that are not all integers."""


class SizeFactorsWarning(UserWarning):
    """Rows scored or transformed without size factors by a fit that had them."""


def check_count_values(values: np.ndarray, *, fractional: str = "warn") -> bool:
    """Check the non-NaN values given to a count likelihood (NaN is missing).

    Values within ``INTEGER_TOLERANCE`` of an integer are counts. Other
    non-negative values (normalised or ambient-corrected counts) are fitted
    under the continuous extension of the count log-likelihoods (``lgamma``
    in place of the factorial, as NMF-KL and GLM-PCA do), with one
    :class:`NonIntegerCountsWarning`; ``fractional="error"`` refuses them and
    ``"allow"`` accepts them silently (the caller warns once, e.g. over many blocks).

    Returns
    -------
    bool
        Whether every value is a count.

    Raises
    ------
    ValueError
        For a negative value, or a non-integer one with ``fractional="error"``.
    """
    flat = values.reshape(-1)
    integral = True
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        chunk = chunk[~np.isnan(chunk)]
        if chunk.size and chunk.max() > MAX_COUNT:
            raise ValueError(
                f"X has counts up to {chunk.max():.4g}, above {MAX_COUNT:,}: spfa computes in "
                "float32, where larger integers are not exact"
            )
        if chunk.size and chunk.min() < 0:
            raise ValueError(
                "Negative values in data passed to a count likelihood: X has negative "
                "values; counts must be non-negative (use likelihood='gaussian' for "
                "data on the real line)"
            )
        integral = integral and bool(np.all(np.abs(chunk - np.rint(chunk)) <= INTEGER_TOLERANCE))
    if not integral and fractional == "error":
        raise ValueError(
            f"X has non-integer values (more than {INTEGER_TOLERANCE:g} from an integer); "
            "binomial thinning splits counts"
        )
    if not integral and fractional == "warn":
        _warn_non_integer(stacklevel=5)
    return integral


def _warn_non_integer(stacklevel: int) -> None:
    warnings.warn(
        "X has non-integer values (more than 1e-6 from an integer): the count "
        "likelihood is used in its continuous extension (lgamma for the factorial), "
        "as for normalised or ambient-corrected counts. Pass raw counts where you "
        "have them.",
        NonIntegerCountsWarning,
        stacklevel=stacklevel,
    )


#: the largest magnitude spfa can compute with (it computes in float32)
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: the root mean square of real-valued data that float32 computes with: the variances
#: (squares, and a 1e-6 noise floor under them) stay within its normal range
DATA_SCALE_RANGE = (1e-15, 1e15)


def check_values(values: np.ndarray, likelihood, *, fractional: str = "warn") -> bool:
    """Check stored data values (NaN is missing): no infinities, nothing beyond float32's
    range, and counts (:func:`check_count_values`) for a count likelihood. Returns whether
    every value is a count (True for a likelihood without integer support)."""
    square_sum, count = _value_sums(values, likelihood)
    _check_scale(square_sum, count)
    if likelihood.integer_support:
        return check_count_values(values, fractional=fractional)
    return True


def _value_sums(values: np.ndarray, likelihood) -> tuple[float, int]:
    """The per-value checks of :func:`check_values`; returns the sum of squares (scaled
    by ``1 / FLOAT32_MAX``) and the number of the observed values of a real-valued
    likelihood, for :func:`_check_scale` (``(0, 0)`` for a count likelihood)."""
    flat = values.reshape(-1)
    square_sum, count = 0.0, 0
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        chunk = chunk[~np.isnan(chunk)]
        if not chunk.size:
            continue
        if not np.isfinite(chunk).all():
            raise ValueError("X has infinite values; mark a missing entry with NaN")
        largest = float(np.abs(chunk).max())
        if largest > FLOAT32_MAX:
            raise ValueError(
                f"X has values beyond float32's range (|x| up to {largest:.3g} > "
                f"{FLOAT32_MAX:.3g}); spfa computes in float32: rescale X"
            )
        if not likelihood.integer_support:
            scaled = chunk.astype(np.float64) / FLOAT32_MAX**0.5  # no overflow in the square
            square_sum += float(np.dot(scaled, scaled))
            count += chunk.size
    return square_sum, count


def _check_scale(square_sum: float, count: int) -> None:
    """Real-valued data whose root mean square float32 cannot square are an error."""
    if count:
        rms = (square_sum / count) ** 0.5 * FLOAT32_MAX**0.5
        if 0 < rms < DATA_SCALE_RANGE[0] or rms > DATA_SCALE_RANGE[1]:
            raise ValueError(
                f"X's values are of order {rms:.3g} (root mean square): their squares fall "
                "outside float32's range, in which spfa computes; rescale X to values of "
                f"order 1 (any scale in {DATA_SCALE_RANGE[0]:g} to {DATA_SCALE_RANGE[1]:g} "
                "gives the same fit)"
            )


def check_data(estimator, X, *, reset: bool, likelihood):
    """Validate ``X``; sparse input stays sparse (CSR), nothing is densified.

    Parameters
    ----------
    estimator : BaseEstimator
        Records ``n_features_in_`` / ``feature_names_in_`` when ``reset``.
    X : array-like, DataFrame or scipy.sparse matrix of shape (n_samples, n_features)
        NaN marks a missing entry.
    reset : bool
        True in ``fit``; False afterwards (the feature count must match).
    likelihood : Likelihood
        Its ``integer_support`` asks for non-negative integers; a model of the
        non-zero entries only (``observes_zeros=False``) needs some.

    Returns
    -------
    X : ndarray of shape (n, p), float64, or scipy.sparse.csr_matrix
        NaN where missing (a stored NaN in a sparse matrix); implicit zeros of
        a sparse matrix are observed zeros. A sparse matrix keeps its dtype
        (float32 or float64): no copy of a large matrix is made just to widen it.
        Rows on disk (:func:`spfa.backed.is_backed`) stay there: a
        :class:`~spfa.backed.BackedRows`, checked block by block (:func:`check_backed`).
    """
    if is_backed(X):
        if likelihood.views is not None:
            raise ValueError("a multi-view fit takes X in memory, not rows on disk")
        return check_backed(estimator, as_backed_rows(X), reset=reset, likelihood=likelihood)
    X = validate_data(
        estimator,
        X,
        reset=reset,
        accept_sparse=("csr", "csc", "coo"),
        dtype=(np.float64, np.float32),
        ensure_all_finite="allow-nan",
        # fitting needs two rows (one row has no variance to fit); new rows may come singly
        ensure_min_samples=2 if reset else 1,
        ensure_min_features=1,
    )
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        if not X.has_canonical_format:
            # duplicate (i, j) entries mean their sum (scipy's reading); the caller's
            # matrix is left as it was
            X = X.copy()
            X.sum_duplicates()
    # Only the stored values need checking: implicit zeros are valid for every likelihood.
    values = X.data if sp.issparse(X) else X
    check_values(values, likelihood)
    if likelihood.integer_support:
        X = _as_counts(X)
        values = X.data if sp.issparse(X) else X
    if likelihood.views is not None:
        X = check_view_counts(X, likelihood)
        values = X.data if sp.issparse(X) else X
    everything_stored = not sp.issparse(X) or X.nnz == X.shape[0] * X.shape[1]
    if everything_stored and _all_nan(values):
        raise ValueError("X has no observed entries (every entry is NaN)")
    if not likelihood.observes_zeros and not np.any((values != 0) & ~np.isnan(values)):
        raise ValueError(
            f"X has no observed non-zero entries; the {likelihood.name} likelihood fits only those"
        )
    if sp.issparse(X):
        return X
    return np.asarray(X, dtype=np.float64)


def check_backed(estimator, X: BackedRows, *, reset: bool, likelihood) -> BackedRows:
    """:func:`check_data` for rows read from disk (:class:`spfa.backed.BackedRows`), block
    by block: the same checks and errors, nothing of ``n x p`` size read at once. Counts
    within ``INTEGER_TOLERANCE`` of integers are rounded as they are read
    (``X.round_counts``); ``X.n_missing`` records the missing (NaN) entries."""
    n, p = X.shape
    minimum = 2 if reset else 1
    if n < minimum:
        raise ValueError(
            f"Found array with {n} sample(s) (shape=({n}, {p})) while a minimum of {minimum} "
            "is required."
        )
    if p < 1:
        raise ValueError(f"Found array with 0 feature(s) (shape=({n}, 0))")
    if reset:
        estimator.n_features_in_ = p
        if hasattr(estimator, "feature_names_in_"):
            del estimator.feature_names_in_
    elif p != estimator.n_features_in_:
        raise ValueError(
            f"X has {p} features, but {type(estimator).__name__} is expecting "
            f"{estimator.n_features_in_} features as input."
        )
    X.round_counts = False
    square_sum, count, n_nan, stored = 0.0, 0, 0, 0
    integral = exact = True
    n_nonzero = n_rounded_nonzero = 0
    for _, _, block in X.blocks(max(1, _CHUNK // p)):
        values = block.data if sp.issparse(block) else block
        block_sums = _value_sums(values, likelihood)
        square_sum, count = square_sum + block_sums[0], count + block_sums[1]
        nan = np.isnan(values)
        observed = values[~nan]
        if likelihood.integer_support:
            integral = check_count_values(values, fractional="allow") and integral
            exact = exact and bool(np.all(observed == np.rint(observed)))
            n_rounded_nonzero += int(np.count_nonzero(np.rint(observed)))
        n_nan += int(nan.sum())
        stored += values.size
        n_nonzero += int(np.count_nonzero(observed))
    _check_scale(square_sum, count)
    if not integral:
        _warn_non_integer(stacklevel=4)
    X.round_counts = bool(likelihood.integer_support and integral and not exact)
    if X.round_counts:  # what the fit will read: a 1e-30 is a zero
        n_nonzero = n_rounded_nonzero
    if stored == n * p and n_nan == stored:
        raise ValueError("X has no observed entries (every entry is NaN)")
    if not likelihood.observes_zeros and not n_nonzero:
        raise ValueError(
            f"X has no observed non-zero entries; the {likelihood.name} likelihood fits only those"
        )
    X.n_missing = n_nan
    X.n_nonzero = n_nonzero
    return X


def check_view_counts(X, likelihood):
    """A multi-view likelihood's count views: the count checks (:func:`check_count_values`)
    on their features' values, and their near-integers rounded (a copy where any is)."""
    views = likelihood.views
    if views.n_features != X.shape[1]:
        raise ValueError(
            f"feature_groups has {views.n_features} entries but X has {X.shape[1]} features: "
            "give one view name per feature"
        )
    counting = np.array([lik.integer_support for lik in likelihood.parts])[views.of]  # (p,)
    if not counting.any():
        return X
    if sp.issparse(X):
        at = counting[X.indices]
        values = X.data[at]
    else:
        X = np.asarray(X)
        values = X[:, counting]
    if not check_count_values(values):
        return X
    rounded = np.rint(values)
    if np.array_equal(rounded, values, equal_nan=True):
        return X
    X = X.copy()
    if sp.issparse(X):
        X.data[at] = rounded
    else:
        X[:, counting] = rounded
    return X


def _as_counts(X):
    """Count data whose values all lie within :data:`INTEGER_TOLERANCE` of integers as
    those integers (a CSV's 2.9999999999999 is the count 3; a 1e-30 is a zero): a copy
    where any differs, ``X`` itself otherwise. Non-integer data are left as they are."""
    values = X.data if sp.issparse(X) else np.asarray(X)
    flat = values.reshape(-1)
    exact = True
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        chunk = chunk[~np.isnan(chunk)]
        rounded = np.rint(chunk)
        if np.any(np.abs(chunk - rounded) > INTEGER_TOLERANCE):
            return X  # not counts: the continuous extension fits them as they are
        exact = exact and bool(np.all(chunk == rounded))
    if exact:
        return X
    if sp.issparse(X):
        X = X.copy()
        X.data = np.rint(X.data)
        return X
    return np.rint(np.asarray(X, dtype=np.float64))


def _all_nan(values: np.ndarray) -> bool:
    flat = values.reshape(-1)
    return all(np.isnan(flat[i : i + _CHUNK]).all() for i in range(0, flat.size, _CHUNK))


def _csr_row_slice(X, rows: slice) -> np.ndarray:
    """Consecutive rows of a validated CSR matrix (no duplicate entries) as a dense
    float64 block, written straight from its arrays: the streamed start reads many
    small blocks, for which scipy's slicing costs more than the block's data."""
    a, b, _ = rows.indices(X.shape[0])
    b = max(a, b)
    lo, hi = X.indptr[a], X.indptr[b]
    x = np.zeros((b - a, X.shape[1]))
    per_row = np.diff(X.indptr[a : b + 1])
    x[np.repeat(np.arange(b - a), per_row), X.indices[lo:hi]] = X.data[lo:hi]
    return x


def dense_rows(X, rows=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of validated ``X`` as a dense float64 block with missing entries at 0.

    Returns
    -------
    x : ndarray of shape (len(rows), p)
    mask : ndarray of the same shape, 1.0 where observed, or None if all are
    """
    if isinstance(X, BackedRows):  # read from disk: consecutive runs of increasing rows
        if rows is None:
            rows = slice(None)
        if isinstance(rows, slice):
            a, b, step = rows.indices(X.shape[0])
            rows = np.arange(a, b, step)
        block = X.read_rows(rows)
        X = block if sp.issparse(block) else np.asarray(block)
        rows = slice(None)
    if sp.issparse(X) and X.format == "csr" and isinstance(rows, slice) and rows.step is None:
        x = _csr_row_slice(X, rows)
    else:
        block = X if rows is None else X[rows]
        if sp.issparse(block):
            x = block.toarray().astype(np.float64, copy=False)
        else:
            x = np.array(block, dtype=np.float64, copy=True)
    nan = np.isnan(x)
    if nan.any():
        x[nan] = 0.0
        return x, (~nan).astype(np.float64)
    return x, None


def check_size_factors(size_factors, n_samples: int, likelihood=None) -> np.ndarray | None:
    """Return ``size_factors`` as float64 ``(n_samples,)`` or None; ValueError if invalid,
    or if ``likelihood`` has no mean for them to scale (``positive_mean`` False)."""
    if size_factors is None:
        return None
    if likelihood is not None and not likelihood.positive_mean:
        raise ValueError(
            f"size_factors are only used by count likelihoods, not by {type(likelihood).__name__}"
        )
    s = np.asarray(size_factors, dtype=np.float64)
    views = getattr(likelihood, "views", None)
    per_view = views is not None and s.ndim == 2 and s.shape == (n_samples, views.n_views)
    if s.ndim == 2 and 1 in s.shape and not per_view:
        s = s.ravel()
    if not per_view and (s.ndim != 1 or s.shape[0] != n_samples):
        also = "" if views is None else f" or ({n_samples}, {views.n_views}), one per view"
        raise ValueError(
            f"size_factors must have shape ({n_samples},), one per sample{also}; got {s.shape}"
        )
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError("size_factors must be finite and strictly positive")
    return s


#: a row with no counts gets the size factor of half a count (log s stays finite)
EMPTY_ROW_COUNT = 0.5


def library_sizes(X, features: np.ndarray | None = None) -> np.ndarray:
    """Row totals of ``X`` (validated: dense with NaN, CSR, or rows on disk), ``(n,)``; a
    row with missing entries is scaled up by ``p / observed`` (its total at the observed
    rate). ``features``: a boolean ``(p,)`` mask of the features to total (all: None)."""
    if features is not None:
        if isinstance(X, BackedRows):
            raise ValueError("a multi-view fit takes X in memory, not rows on disk")
        X = X[:, np.flatnonzero(features)]
    if isinstance(X, BackedRows):
        blocks = X.blocks(max(1, _CHUNK // X.shape[1]))
        return np.concatenate([np.zeros(0)] + [library_sizes(b) for _, _, b in blocks])
    n, p = X.shape
    if sp.issparse(X):
        missing = np.isnan(X.data)
        rows = np.repeat(np.arange(n), np.diff(X.indptr))
        total = np.bincount(rows, weights=np.where(missing, 0.0, X.data), minlength=n)
        n_missing = np.bincount(rows[missing], minlength=n)
    else:
        total, n_missing = np.nansum(X, axis=1), np.isnan(X).sum(axis=1)
    observed = p - n_missing
    return np.where(observed > 0, total * p / np.maximum(observed, 1), 0.0)


def view_size_factors(s: np.ndarray, likelihood) -> np.ndarray:
    """A multi-view fit's size factors, ``(n, n_views)``, from given ones (one per row,
    for every count view, or one per row and view): 1 for the views whose mean they do
    not scale (Gaussian)."""
    scaled = np.array([lik.positive_mean for lik in likelihood.parts])
    return np.where(scaled, s if s.ndim == 2 else s[:, None], 1.0)


def view_library_sizes(X, likelihood) -> np.ndarray:
    """:func:`library_sizes`; for a multi-view likelihood each count view's own, ``(n,
    n_views)`` (1 for the views whose mean size factors do not scale)."""
    views = likelihood.views
    if views is None:
        return library_sizes(X)
    columns = [
        library_sizes(X, views.of == v) if lik.positive_mean else np.ones(X.shape[0])
        for v, lik in enumerate(likelihood.parts)
    ]
    return np.stack(columns, 1)


def library_size_factors(
    X, reference: float | None = None, lib: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """Size factors from library sizes: ``s_i = max(library_i, 1/2) / reference``.

    Parameters
    ----------
    X : ndarray or csr_matrix of shape (n, p)
        Validated counts.
    reference : float, optional
        The training rows' mean library size, so that new rows' factors are on the
        training scale; None: the mean library size of ``X``.
    lib : ndarray of shape (n,), optional
        ``library_sizes(X)`` where already known (rows on disk are read once less).

    Returns
    -------
    s : ndarray of shape (n,)
    reference : float
    """
    lib = library_sizes(X) if lib is None else lib
    if reference is None:
        reference = float(lib.mean()) if lib.ndim == 1 else lib.mean(0)
        if not np.all(reference > 0):
            raise ValueError("every row of X is empty, so library sizes cannot scale the mean")
    return np.maximum(lib, EMPTY_ROW_COUNT) / reference, reference


def default_size_factors(X, s, likelihood, library_size: bool, reference=None):
    """The size factors a fit or new rows use: ``s`` when given; library sizes
    (against ``reference``) when the estimator computes them for a count likelihood;
    otherwise None. Returns ``(s, reference or None)``."""
    views = likelihood.views
    if views is not None and s is not None:
        return view_size_factors(s, likelihood), None
    if s is not None or not library_size or not likelihood.positive_mean:
        return s, None
    if reference is not None and views is not None:
        reference = np.asarray(reference, dtype=float)
    return library_size_factors(X, reference, view_library_sizes(X, likelihood))


def resolve_device(device) -> torch.device:
    """``"auto"`` picks CUDA when available; an unavailable device is an error."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a valid torch device") from err
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        available = torch.cuda.is_available()
        if available and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} was requested but only {torch.cuda.device_count()} CUDA "
                "device(s) are present"
            )
    else:  # mps, xpu, ...: whatever this torch build and machine have
        backend = getattr(torch, dev.type, None) or getattr(torch.backends, dev.type, None)
        is_available = getattr(backend, "is_available", None)
        try:
            available = bool(is_available()) if callable(is_available) else False
        except Exception:  # noqa: BLE001 - a backend this build lacks may raise anything
            available = False
    if not available:
        raise ValueError(
            f"device={device!r} was requested but {dev.type} is not available in this torch "
            "build or on this machine; use device='cpu' or 'auto'"
        )
    return dev


def warn_missing_size_factors(training, given, from_library=False) -> None:
    """A :class:`SizeFactorsWarning` when new rows come without size factors to a fit
    that was given them (e.g. scored inside ``GridSearchCV``, which drops them unless
    metadata routing is enabled); a fit whose factors came from library sizes
    (``from_library``) computes those of new rows the same way."""
    if given is None and training is not None and not from_library:
        warnings.warn(
            "the fit had size_factors but these rows have none, so they get size factor "
            "1: pass size_factors= (inside GridSearchCV or cross_val_score, enable "
            "sklearn.set_config(enable_metadata_routing=True) and request them)",
            SizeFactorsWarning,
            stacklevel=5,
        )


def check_covariates(covariates, n_samples: int, fitted: int | None = None):
    """Known covariates as a float64 ``(n_samples, c)`` array, or None.

    Parameters
    ----------
    covariates : array-like of shape (n_samples, c) or (n_samples,), or None
    n_samples : int
    fitted : int, optional
        The number of covariates of the fit these rows go to (0: it had none); None when
        fitting.

    Raises
    ------
    ValueError
        Non-numeric, non-finite or misshapen covariates; covariates missing for rows of a
        fit that had them, or given to one that had none.
    """
    if covariates is None:
        if fitted:
            raise ValueError(
                f"the fit had {fitted} covariate(s): pass covariates= for these rows too"
            )
        return None
    if fitted == 0:
        raise ValueError("the fit had no covariates, but these rows were given covariates=")
    try:
        C = np.asarray(covariates, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            "covariates must be numeric: one-hot encode categories (spfa.anndata.fit does "
            "for the obs columns it is given)"
        ) from err
    if C.ndim == 1:
        C = C[:, None]
    if C.ndim != 2 or C.shape[0] != n_samples or C.shape[1] < 1:
        raise ValueError(
            f"covariates must have shape ({n_samples}, c), one row per sample; got "
            f"{np.shape(covariates)}"
        )
    if fitted is not None and C.shape[1] != fitted:
        raise ValueError(f"the fit had {fitted} covariate(s); these rows have {C.shape[1]}")
    if not np.all(np.isfinite(C)):
        raise ValueError("covariates contain NaN or infinity")
    return C


def clear_fitted(estimator) -> None:
    """Remove every fitted ``*_`` attribute (before a refit)."""
    for name in [a for a in vars(estimator) if a.endswith("_") and not a.startswith("__")]:
        delattr(estimator, name)


def check_start(init_loadings, init_factors, n: int, p: int, k: int, n_total=None):
    """``(L0, F0)`` as float64 ``(n, k)`` and ``(p, k)`` arrays, or None if neither is given;
    ValueError if ``k`` exceeds ``min(n_total, p)`` (``n_total``: every rank's rows of a
    data-parallel fit, by default ``n``)."""
    n_total = n if n_total is None else n_total
    if k > min(n_total, p):
        raise ValueError(
            f"n_components={k} is larger than the data allow: "
            f"min(n_samples, n_features) = {min(n_total, p)}"
        )
    if init_loadings is None and init_factors is None:
        return None
    if init_loadings is None or init_factors is None:
        raise ValueError("init_loadings and init_factors must be given together")
    out = []
    for name, a, rows in (("init_loadings", init_loadings, n), ("init_factors", init_factors, p)):
        a = np.asarray(a, dtype=np.float64)
        if a.shape != (rows, k):
            raise ValueError(f"{name} must have shape ({rows}, {k}), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or infinity")
        out.append(a)
    return tuple(out)
