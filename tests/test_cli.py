"""The command line: each input format, each command, and errors as one line."""

import gzip
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

ad = pytest.importorskip("anndata")

from spfa.cli import main  # noqa: E402

FAST = ["--max-iter", "150", "--seed", "0"]


def _counts(n=60, p=30, seed=0):
    rng = np.random.default_rng(seed)
    L, F = rng.normal(size=(n, 2)), rng.normal(size=(p, 2)) * (rng.random((p, 2)) < 0.4)
    X = rng.poisson(np.exp(0.5 + 0.8 * L @ F.T)).astype(np.float64)
    genes = [f"GENE{j}" for j in range(p)]
    cells = [f"cell{i}" for i in range(n)]
    return X, cells, genes


def write_input(kind, directory, seed=0):
    """The same counts written in one of the input formats; returns the path."""
    X, cells, genes = _counts(seed=seed)
    if kind == "h5ad":
        adata = ad.AnnData(X=sp.csr_matrix(X))
        adata.obs_names, adata.var_names = cells, genes
        adata.var["highly_variable"] = np.arange(len(genes)) % 2 == 0
        path = directory / "in.h5ad"
        adata.write_h5ad(path)
    elif kind == "10x":
        path = directory / "tenx"
        path.mkdir()
        with gzip.open(path / "matrix.mtx.gz", "wb") as f:
            scipy.io.mmwrite(f, sp.coo_matrix(X.T))  # features x barcodes
        with gzip.open(path / "features.tsv.gz", "wt") as f:
            f.writelines(f"ENSG{j:05d}\t{g}\tGene Expression\n" for j, g in enumerate(genes))
        with gzip.open(path / "barcodes.tsv.gz", "wt") as f:
            f.writelines(f"{c}\n" for c in cells)
    elif kind == "npz":
        path = directory / "in.npz"
        sp.save_npz(path, sp.csr_matrix(X))
    else:
        sep = "," if kind == "csv" else "\t"
        path = directory / f"in.{kind}"
        lines = [sep.join(["", *genes])]
        lines += [
            sep.join([c, *map(str, row.astype(int))]) for c, row in zip(cells, X, strict=True)
        ]
        path.write_text("\n".join(lines) + "\n")
    return path, X, genes


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", ["h5ad", "10x", "npz", "csv", "tsv"])
def test_fit_each_input_format(kind, tmp_path, capsys):
    path, X, genes = write_input(kind, tmp_path)
    out = tmp_path / "out.h5ad"
    code, _, err = run(["fit", path, "-k", "2", "-o", out, "--quiet", *FAST], capsys)
    assert code == 0, err
    result = ad.read_h5ad(out)
    assert result.obsm["X_spfa"].shape == (60, 2)
    assert result.varm["spfa_factors"].shape == (30, 2)
    assert {"params", "elbo", "elbo_contribution"} <= set(result.uns["spfa"])
    np.testing.assert_array_equal(result.X.toarray(), X)  # the counts travel with the result
    if kind != "npz":
        assert list(result.var_names) == genes and result.obs_names[0] == "cell0"


def test_fit_h5ad_keeps_the_input_and_writes_keys_selected_genes_and_model(tmp_path, capsys):
    path, _, genes = write_input("h5ad", tmp_path)
    before = path.read_bytes()
    out, model = tmp_path / "out.h5ad", tmp_path / "model.pt"
    argv = ["fit", path, "-k", "2", "-o", out, "--mask-var", "highly_variable"]
    code, _, err = run([*argv, "--save-model", model, "--quiet", *FAST], capsys)
    assert code == 0, err
    assert path.read_bytes() == before  # the input file is not touched
    result = ad.read_h5ad(out)
    hv = result.var["highly_variable"].to_numpy()
    assert np.all(result.varm["spfa_factors"][~hv] == 0)
    assert model.is_file()

    code, text, _ = run(["top-features", model, "-n", "3", "--min-pip", "0"], capsys)
    assert code == 0
    rows = [line.split("\t") for line in text.strip().splitlines()]
    assert rows[0][:3] == ["factor", "rank", "feature"]
    assert all(r[2] in genes[::2] for r in rows[1:]) and len(rows) > 1

    # a reader that stops early is not an error
    head = subprocess.run(
        f"{sys.executable} -m spfa top-features {model} -n 1000 --min-pip 0 | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert head.stdout.startswith("factor\t") and head.stderr == "", head.stderr

    code, text, _ = run(["info", model], capsys)
    assert code == 0 and "poisson" in text and "15 (named)" in text

    new_dir = tmp_path / "new"
    new_dir.mkdir()
    new, _, _ = write_input("csv", new_dir, seed=1)
    out2 = tmp_path / "new.h5ad"
    code, _, err = run(["transform", model, new, "-o", out2, "--quiet"], capsys)
    assert code == 0, err
    assert ad.read_h5ad(out2).obsm["X_spfa"].shape == (60, 2)


def test_n_top_features_keeps_the_most_abundant_genes(tmp_path, capsys):
    path, X, _ = write_input("csv", tmp_path)
    out = tmp_path / "out.h5ad"
    code, _, err = run(
        ["fit", path, "-k", "2", "-o", out, "--n-top-features", "10", "-q", *FAST], capsys
    )
    assert code == 0, err
    fitted = np.any(ad.read_h5ad(out).varm["spfa_factors"] != 0, axis=1)
    top = np.argsort(-X.sum(0), kind="stable")[:10]
    assert set(np.flatnonzero(fitted)) <= set(top)


def test_choose_k_prints_a_table_and_the_choice(tmp_path, capsys):
    path, _, _ = write_input("npz", tmp_path)
    code, text, err = run(["choose-k", path, "--candidates", "1", "2", "-q", *FAST], capsys)
    assert code == 0, err
    lines = text.strip().splitlines()
    assert lines[0].startswith("k\t") and lines[1].startswith("1\t") and lines[2].startswith("2\t")
    assert lines[-1] in {"chosen k: 1", "chosen k: 2"}


def test_progress_is_shown_and_silenced(tmp_path, capsys, monkeypatch):
    import spfa.progress

    monkeypatch.setattr(spfa.progress, "BAR_DELAY", 0.0)
    path, _, _ = write_input("npz", tmp_path)
    code, _, err = run(["fit", path, "-k", "2", "-o", tmp_path / "a.h5ad", *FAST], capsys)
    assert code == 0 and "spfa fit" in err and "elbo/entry" in err and "wrote" in err
    code, _, err = run(["fit", path, "-k", "2", "-o", tmp_path / "b.h5ad", "-q", *FAST], capsys)
    # only the (real) warning of the short fit is left on stderr
    assert code == 0 and "spfa fit" not in err and "wrote" not in err
    assert all(line.startswith("spfa: warning: ") for line in err.splitlines())


def _bad_inputs(tmp_path):
    corrupt = tmp_path / "corrupt.h5ad"
    corrupt.write_bytes(b"not an hdf5 file")
    text = tmp_path / "text.csv"
    text.write_text(",g1,g2\nc1,1,2\nc2,oops,3\n")
    negative = tmp_path / "negative.csv"
    negative.write_text(",g1,g2\nc1,1,2\nc2,-1,3\nc3,4,0\n")
    empty_dir = tmp_path / "not10x"
    empty_dir.mkdir()
    return [
        (tmp_path / "missing.h5ad", "missing.h5ad: no such file"),
        (corrupt, "not a readable .h5ad"),
        (text, "'oops', which is not a number"),
        (negative, "negative values"),
        (empty_dir, "not a 10x directory"),
        (tmp_path / "x.xlsx", "no such file"),
    ]


def test_bad_input_is_one_line_naming_the_problem(tmp_path, capsys):
    for path, message in _bad_inputs(tmp_path):
        code, out, err = run(["fit", path, "-k", "2", "-o", tmp_path / "o.h5ad", "-q"], capsys)
        assert code == 1, (path, err)
        assert err.startswith("spfa: error: ") and err.count("\n") == 1, err
        assert message.lower() in err.lower(), err
        assert "Traceback" not in err and out == ""


def test_bad_command_lines(tmp_path, capsys):
    path, _, _ = write_input("npz", tmp_path)
    cases = [
        (["fit", path, "-o", tmp_path / "o.h5ad"], 2, "--n-components"),
        (["fit", path, "-k", "2", "-o", tmp_path / "o.csv"], 1, "ending in .h5ad"),
        (["fit", path, "-k", "2", "-o", tmp_path / "no" / "o.h5ad"], 1, "does not exist"),
        (["fit", path, "-k", "2", "-o", tmp_path / "o.h5ad", "--mask-var", "hv"], 1, "'hv'"),
        (["info", tmp_path / "in.npz"], 1, "not a readable spfa model"),
        (["frobnicate"], 2, "invalid choice"),
    ]
    for argv, status, message in cases:
        with pytest.raises(SystemExit) if status == 2 else _nothing() as raised:
            code, _, err = run(argv, capsys)
        if status == 2:
            code = raised.value.code
            err = capsys.readouterr().err
        assert code == status, (argv, err)
        assert err.startswith("spfa: error: ") and err.count("\n") == 1 and message in err, err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "spfa", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("spfa ")


def test_fit_with_obs_covariates_and_transform_new_cells(tmp_path, capsys):
    X, cells, genes = _counts()
    adata = ad.AnnData(X=sp.csr_matrix(X))
    adata.obs_names, adata.var_names = cells, genes
    adata.obs["batch"] = np.where(np.arange(60) % 3 == 0, "run1", "run2")
    path, out, model = tmp_path / "in.h5ad", tmp_path / "out.h5ad", tmp_path / "model.pt"
    adata.write_h5ad(path)
    argv = ["fit", path, "-k", "2", "-o", out, "--covariates", "batch"]
    code, _, err = run([*argv, "--save-model", model, "--quiet", *FAST], capsys)
    assert code == 0, err
    result = ad.read_h5ad(out)
    assert result.varm["spfa_covariates"].shape == (30, 2)
    assert list(result.uns["spfa"]["covariates"]) == ["batch=run1", "batch=run2"]
    # the saved model reads new cells' covariates from the same obs column
    new = tmp_path / "new.h5ad"
    adata[:10].write_h5ad(new)
    code, _, err = run(["transform", model, new, "-o", tmp_path / "t.h5ad", "--quiet"], capsys)
    assert code == 0, err
    code, _, err = run(["fit", path, "-k", "2", "-o", out, "--covariates", "nope", "-q"], capsys)
    assert code != 0 and "not a column of adata.obs" in err


def test_fit_views_from_a_var_column(tmp_path, capsys):
    """--feature-groups names the var column of each gene's view; --likelihood then takes
    VIEW=NAME per view, and info reports the views."""
    X, cells, genes = _counts()
    adata = ad.AnnData(X=sp.csr_matrix(X))
    adata.obs_names, adata.var_names = cells, genes
    adata.var["feature_types"] = np.where(np.arange(30) < 24, "Gene Expression", "Antibody")
    path, out, model = tmp_path / "in.h5ad", tmp_path / "out.h5ad", tmp_path / "model.pt"
    adata.write_h5ad(path)
    views = [
        "--likelihood",
        "Gene Expression=poisson",
        "--likelihood",
        "Antibody=negative_binomial",
    ]
    argv = ["fit", path, "-k", "2", "-o", out, "--feature-groups", "feature_types", *views]
    code, _, err = run([*argv, "--save-model", model, "--quiet", *FAST], capsys)
    assert code == 0, err
    result = ad.read_h5ad(out)
    assert list(result.uns["spfa"]["views"]) == ["Gene Expression", "Antibody"]
    assert result.uns["spfa"]["view_elbo_contribution"].shape == (2, 2)
    code, text, err = run(["info", model], capsys)
    assert code == 0 and "Gene Expression (24), Antibody (6)" in text, err
    code, _, err = run(["fit", path, "-k", "2", "-o", out, *views, "-q"], capsys)
    assert code != 0 and "--feature-groups" in err
    twice = ["--likelihood", "Antibody=poisson", "--likelihood", "Antibody=gaussian"]
    code, _, err = run([*argv[:-4], *twice, "-q"], capsys)
    assert code != 0 and "names a view twice" in err
    code, _, err = run(["choose-k", path, "--candidates", "1", "2", *views, "-q"], capsys)
    assert code != 0 and "fits one likelihood" in err


def test_an_interrupted_fit_writes_what_it_has(tmp_path, capsys, interrupt_at):
    """Ctrl-C during a fit from the shell: the fit so far is written to the output and
    the model file, and the command exits 130 saying so."""
    path, _, _ = write_input("h5ad", tmp_path)
    out, model = tmp_path / "out.h5ad", tmp_path / "model.pt"
    interrupt_at(60)  # in the second window: no stopping rule has ended the fit before
    argv = ["fit", path, "-k", "2", "-o", out, "--save-model", model, "--quiet"]
    code, _, err = run([*argv, "--max-iter", "1000", "--seed", "0"], capsys)
    assert code == 130
    assert err.startswith("spfa: error: interrupted: ") and err.count("\n") == 1
    assert "interrupted at step 59" in err and f"wrote that fit to {out} and {model}" in err
    result = ad.read_h5ad(out)
    assert "interrupted at step 59" in result.uns["spfa"]["interrupted"]
    assert len(result.uns["spfa"]["elbo"]) == 50
    code, text, _ = run(["info", model], capsys)
    assert code == 0 and "poisson" in text


def test_an_interrupt_while_reading_a_table_is_not_called_a_bad_file(tmp_path, capsys, monkeypatch):
    """pandas' C parser reports a Ctrl-C during its read as a ParserError ("Calling
    read(nbytes) on source failed"); spfa says it was interrupted, and a bad file is still
    a bad file."""
    import os
    import signal
    import time

    import pandas as pd

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    path, _, _ = write_input("csv", tmp_path)

    def read_csv(*args, **kwargs):  # a Ctrl-C mid-read, reported as pandas reports it
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            raise pd.errors.ParserError("C error: Calling read(nbytes) on source failed") from None

    monkeypatch.setattr(pd, "read_csv", read_csv)
    code, _, err = run(["fit", path, "-k", "2", "-o", tmp_path / "out.h5ad", "--quiet"], capsys)
    assert code == 130 and f"interrupted while reading {path}" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def bad(*args, **kwargs):  # the same error without an interrupt: a bad file
        raise pd.errors.ParserError("C error: Expected 3 fields in line 4, saw 5")

    monkeypatch.setattr(pd, "read_csv", bad)
    code, _, err = run(["fit", path, "-k", "2", "-o", tmp_path / "out.h5ad", "--quiet"], capsys)
    assert code == 1 and "is not a readable table" in err
