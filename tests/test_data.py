"""Row batches: sparse and dense agree, the step ELBO is unbiased, minibatch fits work
without ever densifying sparse input."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning

from spfa import SparseFactorAnalysis
from spfa.data import RowBatches
from spfa.evaluation import relative_error
from spfa.expectation import GaussHermite
from spfa.likelihoods import Poisson, get_likelihood
from spfa.model import SparseFactorModel
from spfa.simulate import simulate, simulate_sparse_counts

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def counts():
    x = simulate("poisson", n=50, p=30, pi0=(0.3, 0.6), slab_sd=(1.0, 1.5), seed=5).x
    x[3, 4] = x[10, 0] = np.nan  # missing entries
    return x


def _model(n, p, likelihood="poisson", link="softplus"):
    lik = get_likelihood(likelihood, link)
    lik.initialize(np.ones(p), np.ones(p))
    model = SparseFactorModel(n, p, 2, lik)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(0.3 * torch.randn(prm.shape, generator=gen))
    return model


@pytest.mark.parametrize("entries", [False, True])
def test_sparse_and_dense_batches_hold_the_same_data(counts, entries):
    log_s = np.log(np.linspace(0.5, 2.0, counts.shape[0]))
    dense = RowBatches(counts, log_s, 16, entries=entries, device=CPU, seed=0)
    csr = RowBatches(sp.csr_matrix(counts), log_s, 16, entries=entries, device=CPU, seed=0)
    assert dense.n_batches == csr.n_batches == 4
    assert dense.n_observed == csr.n_observed
    seen = []
    for a, b in zip(dense, csr, strict=True):
        assert torch.equal(a.rows, b.rows)
        if entries:
            key = lambda t: (t.entry_rows * 100 + t.cols).argsort()  # noqa: E731
            ka, kb = key(a), key(b)
            assert torch.equal(a.x[ka], b.x[kb]) and torch.equal(a.cols[ka], b.cols[kb])
            assert bool((a.x > 0).all())
        else:
            assert torch.equal(a.x, b.x) and torch.equal(a.mask, b.mask)
            assert not torch.isnan(a.x).any()
        seen.append(a.rows)
    # the batches partition the rows
    assert sorted(torch.cat(seen).tolist()) == list(range(counts.shape[0]))


def test_elbo_from_a_subset_of_batches_is_scaled_to_all_rows():
    """Pruning's evaluation on the first batches of the fixed partition scales their rows'
    terms to all rows: exact where every row is the same (one row repeated), and
    the whole ELBO when every batch is used."""
    row = simulate("poisson", n=1, p=30, seed=2).x
    x = np.repeat(row, 40, axis=0)
    model = _model(40, 30)
    with torch.no_grad():  # every row the same q(L), so every row the same terms
        for prm in model.loadings.variational_parameters():
            prm.copy_(prm[:1].expand_as(prm))
    data = RowBatches(x, None, 8, entries=False, device=CPU, seed=0)
    rule = GaussHermite(8)
    with torch.no_grad():
        whole = data.total_terms(model, rule, None)
        part = data.total_terms(model, rule, None, 2)
        every = data.total_terms(model, rule, None, data.n_batches)
        one = RowBatches(x, None, None, entries=False, device=CPU, seed=0)
        single = one.total_terms(model, rule, None)
    for got in (part, every, whole):
        torch.testing.assert_close(got.stacked(), single.stacked(), rtol=1e-5, atol=1e-3)


def test_float32_sparse_input_is_neither_copied_nor_widened(counts):
    from spfa._validation import check_data

    x64 = sp.csr_matrix(np.nan_to_num(counts))
    x32 = x64.astype(np.float32)
    est = SparseFactorAnalysis(2)
    checked = check_data(est, x32, reset=True, likelihood=Poisson())
    assert checked.dtype == np.float32 and np.shares_memory(checked.data, x32.data)
    a = RowBatches(x32, None, 16, entries=False, device=CPU, seed=0)
    b = RowBatches(x64, None, 16, entries=False, device=CPU, seed=0)
    assert a._cols.dtype == torch.int32 and a._values.dtype == torch.float32
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u.x, v.x) and torch.equal(u.rows, v.rows)
    # the same fit either way: the batches hold float32 values in both cases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fits = [
            SparseFactorAnalysis(2, batch_size=16, max_iter=20, random_state=0).fit(x)
            for x in (x32, x64)
        ]
    np.testing.assert_allclose(fits[0].loadings_, fits[1].loadings_, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("entries", [False, True])
def test_step_estimates_average_to_the_whole_elbo(counts, entries):
    # with a deterministic expectation, the mean of the scaled batch ELBOs over a
    # pass is exactly the whole data set's ELBO: the step estimate is unbiased
    n, p = counts.shape
    model = _model(n, p, "zt_poisson" if entries else "poisson")
    rule = GaussHermite(6)
    whole = RowBatches(counts, None, None, entries=entries, device=CPU, seed=0)
    batches = RowBatches(sp.csr_matrix(counts), None, 16, entries=entries, device=CPU, seed=1)
    with torch.no_grad():
        full = whole.total_terms(model, rule, None)
        one = whole.step_terms(model, rule, None)
        summed = batches.total_terms(model, rule, None)
        steps = [batches.step_terms(model, rule, None) for _ in range(batches.n_batches)]
    assert float(one.elbo) == pytest.approx(float(full.elbo), rel=1e-6)
    assert float(summed.elbo) == pytest.approx(float(full.elbo), rel=1e-5)
    mean_step = np.mean([float(t.elbo) for t in steps])
    assert mean_step == pytest.approx(float(full.elbo), rel=1e-5)
    # each step's factors' KL is counted once, not once per batch
    assert float(steps[0].kl_f) == pytest.approx(float(full.kl_f), rel=1e-6)


def test_minibatch_updates_only_the_batch_rows():
    x = simulate("poisson", n=40, p=20, seed=2).x
    est = SparseFactorAnalysis(2, batch_size=10, max_iter=1, random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(x)
    assert est.n_iter_ == 1  # one pass of 4 steps
    assert len(est.history_["elbo"]) == 1


def test_sparse_input_is_never_densified_whole(monkeypatch):
    sim = simulate_sparse_counts(600, 200, k=3, seed=3)
    import spfa.fitting as fitting_module

    # chunks of 64 rows: every dense block the fit may make is at most 64 x p
    monkeypatch.setattr(fitting_module, "INIT_ENTRIES", 64 * 200)
    original = sp.csr_matrix.toarray
    shapes = []

    def guarded(self, *args, **kwargs):
        shapes.append(self.shape)
        if self.shape[0] > 64:
            raise AssertionError(f"densified {self.shape}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sp.csr_matrix, "toarray", guarded)
    est = SparseFactorAnalysis(3, batch_size=100, max_iter=30, random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(sim.x, size_factors=sim.size_factors)
        Z = est.transform(sim.x[:100], size_factors=sim.size_factors[:100])
    assert np.isfinite(est.loadings_).all() and Z.shape == (100, 3)
    assert shapes and max(shape[0] for shape in shapes) <= 64  # the guard saw the blocks
    with pytest.raises(AssertionError, match="densified"):
        sim.x.toarray()  # and it works


@pytest.mark.slow
@pytest.mark.parametrize("likelihood", ["gaussian", "poisson"])
def test_minibatch_fit_matches_full_batch_quality(likelihood):
    # the notebook's sanity-check design, 4 batches of 25 rows
    errors = {}
    for batch_size in (None, 25):
        err = []
        for seed in (1, 2):
            sim = simulate(likelihood, seed=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                est = SparseFactorAnalysis(
                    3, likelihood=likelihood, batch_size=batch_size, random_state=0, device="cpu"
                ).fit(sp.csr_matrix(sim.x) if likelihood == "poisson" else sim.x)
            err.append(relative_error(est.inverse_transform(est.loadings_), sim.mean))
        errors[batch_size] = np.mean(err)
    assert errors[25] < errors[None] + 0.03, errors


def test_bad_batch_size(counts):
    with pytest.raises(ValueError, match="batch_size"):
        SparseFactorAnalysis(2, batch_size=0).fit(np.nan_to_num(counts))


def test_minibatch_gradients_of_per_sample_parameters_are_sparse(counts):
    """Under minibatching every per-sample parameter (loadings, the full NB's ``u``)
    gets a sparse gradient on the batch's rows only, so SparseAdam leaves the other
    rows exactly where they are (no momentum drift)."""
    from spfa.likelihoods import NegativeBinomial

    x = np.nan_to_num(counts)
    n, p = x.shape
    model = _model(n, p, NegativeBinomial(dispersion="full"))
    lik = model.likelihood
    gen = torch.Generator().manual_seed(0)
    local = model.row_parameters()
    assert any(prm is lik.dispersion_rows for prm in local) and len(local) == 4
    data = RowBatches(x, None, 16, entries=False, device=CPU, seed=0)
    model.sparse_rows = True
    batch = data.next_batch()
    terms = batch.terms(model, None, GaussHermite(3), gen, float(data.n_batches))
    terms.elbo.backward()
    for prm in local:
        assert prm.grad.is_sparse
        touched = prm.grad.coalesce().indices()[0].unique()
        assert set(touched.tolist()) <= set(batch.rows.tolist())
    before = [prm.detach().clone() for prm in local]
    torch.optim.SparseAdam(local, lr=0.1).step()
    outside = np.setdiff1d(np.arange(n), batch.rows.numpy())
    for prm, old in zip(local, before, strict=True):
        assert torch.equal(prm.detach()[outside], old[outside])
        assert not torch.equal(prm.detach()[batch.rows], old[batch.rows])
    model.sparse_rows = False
    assert not lik.sparse_rows


@pytest.mark.cuda
@pytest.mark.parametrize("entries", [False, True])
def test_sparse_batches_on_cuda_match_cpu(counts, entries):
    """The compressed layout (int32 columns, rows from the host indptr) on a GPU."""
    x = sp.csr_matrix(np.nan_to_num(counts))
    cuda = torch.device("cuda")
    on_cpu = RowBatches(x, None, 16, entries=entries, device=CPU, seed=0)
    on_gpu = RowBatches(x, None, 16, entries=entries, device=cuda, seed=0)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b.x.device.type == "cuda"
        assert torch.equal(a.x, b.x.cpu()) and torch.equal(a.rows, b.rows.cpu())
        if entries:
            assert torch.equal(a.entry_rows, b.entry_rows.cpu())
    est = SparseFactorAnalysis(2, batch_size=16, max_iter=5, device="cuda", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(x)
    assert np.all(np.isfinite(est.transform(x[:7])))


def _assembled(start, n):
    """A streamed start's loadings and their precisions, gathered from its blocks."""
    values, precision = (
        np.full((n, start.factors.shape[1]), np.nan),
        np.full((n, start.factors.shape[1]), np.nan),
    )
    for rows, v, prec in start.loading_blocks():
        values[rows], precision[rows] = v, prec
    return values, precision


@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("nonnegative", [(False, False), (True, False), (True, True)])
def test_start_streamed_over_row_blocks_matches_the_whole_data_start(missing, nonnegative):
    """The block-by-block start (subspace iteration accumulated over blocks of 16 rows)
    gives the intercept, nuisance parameters and precisions of the whole-data start, the
    same rank-k working fit L0 F0^T up to the iteration's accuracy, the same signs for a
    non-negative family, and the loadings' root mean squares that ``start_prior_`` reads,
    without keeping any array of n rows."""
    from spfa.initialization import initialize, initialize_streamed
    from spfa.likelihoods import get_likelihood

    sim = simulate_sparse_counts(150, 60, k=3, seed=5)
    x = sim.x.toarray()
    mask = None
    if missing:
        mask = (np.random.default_rng(0).random(x.shape) > 0.1).astype(float)
        x = x * mask
    s = sim.size_factors
    starts = []
    for streamed in (False, True):
        lik = get_likelihood("negative_binomial", "exp")
        rng = np.random.RandomState(0)
        if streamed:

            def blocks():
                for a in range(0, 150, 16):
                    rows = slice(a, min(a + 16, 150))
                    yield rows, x[rows], None if mask is None else mask[rows], s[rows]

            start = initialize_streamed(
                blocks, 150, 60, 3, lik, True, rng, nonnegative=nonnegative, n_power_iter=4
            )
            assert start.loadings is None and start.loadings_precision is None
            rms = start.loadings_scale()
            assert rms.shape == (1, 3)
            start.loadings, start.loadings_precision = _assembled(start, 150)
        else:
            start = initialize(x, mask, s, 3, lik, True, rng, nonnegative=nonnegative)
        starts.append((start, lik.inverse_dispersion.detach().double().numpy()))
    (dense, r_dense), (streamed, r_streamed) = starts
    for key in ("mean", "log_var", "prior_mean", "prior_log_prec"):
        np.testing.assert_allclose(streamed.intercept[key], dense.intercept[key], rtol=1e-10)
    fit_dense = dense.loadings @ dense.factors.T
    fit_streamed = streamed.loadings @ streamed.factors.T
    # the exact SVD against the subspace iteration: 0.002-0.005 apart
    assert np.linalg.norm(fit_streamed - fit_dense) < 1e-2 * np.linalg.norm(fit_dense)
    # the dispersions come from the residual that L0 F0^T leaves: up to 1.7 % apart
    np.testing.assert_allclose(r_streamed, r_dense, rtol=0.05)
    for side in ("loadings_precision", "factors_precision"):
        # the same up to the sign-free rotation of the SVD: compare sums per factor
        np.testing.assert_allclose(
            np.sort(getattr(streamed, side).sum(0)), np.sort(getattr(dense, side).sum(0)), rtol=1e-2
        )
    # the loadings' scale for the prior's start: the root mean square of the values (of
    # their positive part under a non-negative L), as the whole-data start gives it
    part = np.maximum(streamed.loadings, 0) if nonnegative[0] else streamed.loadings
    np.testing.assert_allclose(rms[0], np.sqrt(np.mean(part**2, axis=0)), rtol=1e-10)
    np.testing.assert_array_equal(dense.loadings_scale(), dense.loadings)
    if any(nonnegative):  # the sign that keeps the larger positive part, on both
        side = "loadings" if nonnegative[0] else "factors"
        for start in (dense, streamed):
            values = getattr(start, side)
            pos = np.linalg.norm(np.maximum(values, 0), axis=0)
            neg = np.linalg.norm(np.minimum(values, 0), axis=0)
            if not all(nonnegative):
                assert np.all(pos >= neg)


def test_dense_rows_of_a_csr_slice_equal_scipys_slicing():
    """The direct path for consecutive CSR rows (the streamed start's small blocks) gives
    what scipy's slicing gives, with empty rows, a stored NaN (missing) and the last rows."""
    from spfa._validation import dense_rows

    rng = np.random.default_rng(3)
    dense = np.rint(rng.random((40, 13)) * 9) * (rng.random((40, 13)) < 0.3)
    dense[5] = 0.0
    X = sp.csr_matrix(dense)
    X.data[7] = np.nan
    for a, b in [(0, 40), (3, 9), (5, 6), (38, 45), (12, 12)] + [
        tuple(sorted(rng.integers(0, 40, 2))) for _ in range(5)
    ]:
        x, mask = dense_rows(X, slice(a, b))
        x_ref, mask_ref = dense_rows(X.tocsc(), slice(a, b))  # scipy's slicing
        np.testing.assert_array_equal(x, x_ref)
        assert (mask is None) == (mask_ref is None)
        if mask is not None:
            np.testing.assert_array_equal(mask, mask_ref)


@pytest.mark.parametrize("link_name", ["exp", "softplus", "identity"])
def test_working_response_is_the_tangent_capped_by_the_exact_deviation(link_name):
    """The working response equals its definition computed on every entry: the tangent
    ``(y - mu0) / h'(eta0)``, capped by ``h^{-1}(y) - eta0`` where ``y > mu0`` (the
    implementation evaluates the cap only on those entries)."""
    from spfa.initialization import working_response
    from spfa.links import get_link

    link = get_link(link_name)
    rng = np.random.default_rng(1)
    y = rng.poisson(0.4, (30, 7)).astype(float) * rng.gamma(2.0, 1.0, (30, 1))
    eta0 = rng.normal(-1.0, 0.5, 7)
    mu0 = link(torch.as_tensor(eta0, dtype=torch.float64)).numpy()
    slope = link.derivative(eta0)
    tangent = (y - mu0) / slope
    with np.errstate(divide="ignore", invalid="ignore"):
        exact = link.inverse(np.where(y > mu0, y, mu0)) - eta0
    expected = np.where((y > mu0) & np.isfinite(exact), np.minimum(tangent, exact), tangent)
    got = working_response(link, y, mu0, eta0, slope)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    if link_name != "identity":  # a convex link: the cap binds somewhere
        assert np.any(got < tangent - 1e-9)


def test_the_full_batch_keeps_its_data_transposed_for_the_factors_gradient(counts, monkeypatch):
    import spfa.likelihoods.poisson as poisson

    x = np.nan_to_num(counts)
    model = _model(*x.shape, link="exp")
    assert model.likelihood.closed_form  # the exp link's Poisson, which reads the cache
    log_s = np.log(np.linspace(0.5, 2.0, x.shape[0]))
    full = RowBatches(x, log_s, None, entries=False, device=CPU, seed=0)
    mini = RowBatches(x, log_s, 16, entries=False, device=CPU, seed=0)
    assert full.batch(0) is full.batch(0) and full.batch(0).cache["reused"]
    assert not mini.batch(0).cache["reused"]
    grads = []
    for reused in (True, False):
        batch = full.batch(0)
        batch.cache.clear()
        batch.cache["reused"] = reused
        for _ in range(2):  # the second step reads what the first cached
            model.zero_grad()
            batch.terms(model, full.log_s, GaussHermite(8), None, 1.0).err.backward()
        assert (batch.cache["xt"] is not None) == reused
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # beyond the memory bound the product reads x itself
    monkeypatch.setattr(poisson, "TRANSPOSE_ENTRIES", x.size - 1)
    batch = full.batch(0)
    batch.cache.clear()
    batch.cache["reused"] = True
    batch.terms(model, full.log_s, GaussHermite(8), None, 1.0).err.backward()
    assert batch.cache["xt"] is None


@pytest.mark.parametrize("covariates", [False, True])
def test_the_whole_data_start_without_a_mask_is_the_start_with_every_entry_observed(covariates):
    """Without a mask the start skips the mask's products; with a mask of ones it takes
    them: the same start."""
    from spfa.initialization import initialize
    from spfa.likelihoods import get_likelihood

    sim = simulate_sparse_counts(120, 50, k=3, seed=6)
    x, s = sim.x.toarray(), sim.size_factors
    cov = np.random.default_rng(1).normal(size=(120, 2)) if covariates else None
    starts = []
    for mask in (None, np.ones_like(x)):
        lik = get_likelihood("negative_binomial", "exp")
        start = initialize(x, mask, s, 3, lik, True, np.random.RandomState(0), covariates=cov)
        starts.append((start, lik.inverse_dispersion.detach().double().numpy()))
    (plain, r_plain), (masked, r_masked) = starts
    np.testing.assert_allclose(r_plain, r_masked, rtol=1e-10)
    for key in ("mean", "log_var", "prior_mean", "prior_log_prec"):
        np.testing.assert_allclose(plain.intercept[key], masked.intercept[key], rtol=1e-10)
    names = ["loadings", "factors", "loadings_precision", "factors_precision"]
    if covariates:
        names += ["covariate_coef", "covariate_precision"]
    for name in names:
        np.testing.assert_allclose(getattr(plain, name), getattr(masked, name), rtol=1e-9)
