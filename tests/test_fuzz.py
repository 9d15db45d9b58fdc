"""Property-based fuzzing of everything a user can hand spfa.

Each property draws adversarial inputs (shapes, dtypes, containers, sparse formats with
duplicates, NaN, inf, negative, huge, tiny and non-integer values, empty and constant rows
and columns, exactly low-rank data, every likelihood x link x prior) and asserts that spfa
either refuses them with a ``ValueError``/``TypeError`` whose message says something, or
returns a finite result -- never NaN, never another exception type, and never a silent
change of the data. The default profile runs a few thousand examples in CI time; the
``slow`` tests run more (``HYPOTHESIS_PROFILE=thorough`` raises every count).
"""

import os
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spfa import LIKELIHOODS, LINKS, PRIORS, SparseFactorAnalysis
from spfa._validation import check_data
from spfa.likelihoods import get_likelihood

settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "thorough", deadline=None, max_examples=5000, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"

SPECIAL = [np.nan, np.inf, -np.inf, -1.0, -1e-3, 0.0, 0.5, 1.0, 1e-30, 1e-45, 3.0, 1e30, 1e39]


@st.composite
def matrices(draw, min_rows=1, max_rows=12, max_cols=8):
    """A matrix in some container, and its meaning as a dense float64 array (NaN missing)."""
    n = draw(st.integers(min_rows, max_rows))
    p = draw(st.integers(1, max_cols))
    kind = draw(st.sampled_from(["counts", "normal", "special", "lowrank", "constant"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "counts":
        x = rng.poisson(draw(st.sampled_from([0.05, 1.0, 20.0])), size=(n, p)).astype(float)
    elif kind == "normal":
        x = rng.normal(size=(n, p)) * draw(st.sampled_from([1e-20, 1e-6, 1.0, 1e6, 1e20]))
    elif kind == "lowrank":
        x = np.outer(rng.normal(size=n), rng.normal(size=p))
    elif kind == "constant":
        x = np.full((n, p), draw(st.sampled_from([0.0, 1.0, 7.0])))
    else:
        x = rng.choice(SPECIAL, size=(n, p))
    if draw(st.booleans()):  # sprinkle specials into any kind
        count = draw(st.integers(1, max(1, n * p // 3)))
        rows, cols = rng.integers(0, n, count), rng.integers(0, p, count)
        x[rows, cols] = draw(st.sampled_from(SPECIAL))
    if draw(st.booleans()) and n > 1:
        x[draw(st.integers(0, n - 1))] = draw(st.sampled_from([0.0, np.nan]))  # an empty row
    if draw(st.booleans()):
        x[:, draw(st.integers(0, p - 1))] = draw(st.sampled_from([0.0, np.nan]))
    container = draw(
        st.sampled_from(["ndarray", "float32", "int", "list", "frame", "csr", "csc", "coo", "dup"])
    )
    meaning = x.copy()
    if container == "float32":
        with np.errstate(over="ignore"):
            data = x.astype(np.float32)
        meaning = data.astype(np.float64)
    elif container == "int":
        if not np.isfinite(x).all() or np.abs(x).max(initial=0) > 2**62:
            container = "ndarray"
            data = x
        else:
            data = x.astype(np.int64)
            meaning = data.astype(np.float64)
    if container == "ndarray":
        data = x
    elif container == "list":
        data = x.tolist()
    elif container == "frame":
        data = pd.DataFrame(x, columns=[f"g{j}" for j in range(p)])
    elif container in ("csr", "csc", "coo"):
        data = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "coo": sp.coo_matrix}[container](x)
    elif container == "dup":
        # every stored value split in two entries at the same (i, j)
        coo = sp.coo_matrix(x)
        finite = np.isfinite(coo.data)
        half = np.where(finite, coo.data / 2, coo.data)
        other = np.where(finite, coo.data - np.where(finite, half, 0.0), 0.0)
        data = sp.csr_matrix(
            (
                np.concatenate([half, other]),
                (np.concatenate([coo.row, coo.row]), np.concatenate([coo.col, coo.col])),
            ),
            shape=x.shape,
        )
        data = sp.csr_matrix((data.data, data.indices, data.indptr), shape=x.shape)
        meaning = _summed(coo.row, coo.col, half, other, x.shape)
    return data, meaning


def _summed(rows, cols, a, b, shape):
    out = np.zeros(shape)
    np.add.at(out, (rows, cols), a)
    np.add.at(out, (rows, cols), b)
    return out


def _model_choice():
    pairs = []
    for name in sorted(LIKELIHOODS):
        for link in sorted(LINKS):
            try:
                get_likelihood(name, link)
            except ValueError:
                continue
            pairs.append((name, link))
    return st.tuples(st.sampled_from(pairs), st.sampled_from(sorted(PRIORS)))


def _refused(err: Exception) -> None:
    assert isinstance(err, (ValueError, TypeError)), f"{type(err).__name__}: {err}"
    assert len(str(err)) > 10, f"an unhelpful message: {err!r}"


@given(matrices(), _model_choice())
@settings(max_examples=3000 if not THOROUGH else 20000)
def test_validation_refuses_clearly_or_keeps_the_data_exactly(case, model):
    """check_data: a clear refusal, or exactly the data that was meant (duplicates
    summed, NaN kept missing) -- no silent change."""
    data, meaning = case
    (name, link), _ = model
    est = SparseFactorAnalysis()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            X = check_data(est, data, reset=True, likelihood=get_likelihood(name, link))
    except Exception as err:  # noqa: BLE001 - the property is about which exceptions
        _refused(err)
        return
    dense = X.toarray() if sp.issparse(X) else np.asarray(X)
    counts = get_likelihood(name, link).integer_support
    near = np.abs(meaning - np.rint(meaning)) <= 1e-6
    if counts and np.all(near | np.isnan(meaning)):
        meaning = np.rint(meaning)  # values within the tolerance of integers are counts
    np.testing.assert_array_equal(np.isnan(dense), np.isnan(meaning))
    ok = ~np.isnan(meaning)
    rtol = 1e-6 if dense.dtype == np.float32 else 0
    np.testing.assert_allclose(dense[ok], meaning[ok], rtol=rtol)
    assert np.isfinite(dense[ok]).all()


def _fit_case(data, model, n_components, **kw):
    (name, link), prior = model
    est = SparseFactorAnalysis(
        n_components,
        likelihood=name,
        link=link,
        prior=prior,
        max_iter=40,
        random_state=0,
        **kw,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(data)
            Z = est.transform(data)
            M = est.inverse_transform(Z)
    except Exception as err:  # noqa: BLE001
        _refused(err)
        return None
    assert np.isfinite(est.elbo_), "a fit returned a non-finite ELBO"
    for name_ in ("components_", "loadings_", "elbo_contribution_", "factors_pip_"):
        assert np.isfinite(getattr(est, name_)).all(), f"non-finite {name_}"
    assert np.isfinite(Z).all() and np.isfinite(M).all(), "non-finite transform/inverse"
    return est


@given(matrices(min_rows=2, max_rows=10, max_cols=6), _model_choice(), st.integers(1, 3))
@settings(max_examples=120 if not THOROUGH else 3000)
def test_fit_refuses_clearly_or_is_finite(case, model, k):
    _fit_case(case[0], model, k)


@pytest.mark.slow
@given(matrices(min_rows=2, max_rows=10, max_cols=6), _model_choice(), st.integers(1, 3))
@settings(max_examples=300 if not THOROUGH else 5000)  # 70 s at 600 held CI near its limit
def test_fit_refuses_clearly_or_is_finite_longer(case, model, k):
    _fit_case(case[0], model, k)


@given(
    st.one_of(
        st.integers(-3, 0),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=3),
        st.none(),
        st.booleans(),
    ),
    st.sampled_from(
        ["n_components", "max_iter", "tol", "learning_rate", "batch_size", "n_mc_samples"]
    ),
)
@settings(max_examples=400)
def test_bad_parameters_are_refused_by_name(value, param):
    X = np.ones((4, 3))
    est = SparseFactorAnalysis(2, max_iter=20).set_params(**{param: value})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(X)
    except Exception as err:  # noqa: BLE001
        _refused(err)
        assert param in str(err) or param.replace("_", " ") in str(err), str(err)
        return
    # accepted: only values the parameter allows
    assert est.get_params()[param] == value
