"""The ``spfa`` command line (also ``python -m spfa``).

::

    spfa fit INPUT --n-components K --output OUT.h5ad [options]
    spfa transform MODEL INPUT --output OUT.h5ad
    spfa info MODEL
    spfa top-features MODEL [-n 10]
    spfa choose-k INPUT --candidates 5 10 20
    spfa plot RESULT.h5ad --output FIGURE.png [--groupby COLUMN]

INPUT is a ``.h5ad`` file, a 10x directory, a ``.npz`` (scipy sparse) or a
``.csv``/``.tsv`` table (:func:`spfa.io.read`). Tables go to stdout; progress and
log records to stderr (``--quiet`` silences them). A problem with the input is one
line on stderr, ``spfa: error: ...``, and exit status 1 (2 for a bad command line);
warnings are one line each, ``spfa: warning: ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

from ._version import __version__
from .progress import BarSafeHandler

__all__ = ["main"]

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message):
        self.exit(2, f"spfa: error: {message} (see spfa {self.prog.split()[-1]} --help)\n")


class CommandError(Exception):
    """A problem the user can fix, reported as one line."""


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _estimator_options(parser) -> None:
    from .likelihoods import LIKELIHOODS
    from .priors import PRIORS

    group = parser.add_argument_group("model")
    group.add_argument(
        "--likelihood",
        action="append",
        default=None,
        metavar="NAME",
        help=f"one of {', '.join(sorted(LIKELIHOODS))} (default poisson); or, with "
        "--feature-groups, VIEW=NAME once per view (e.g. --likelihood 'Gene "
        "Expression=negative_binomial' --likelihood 'Antibody Capture=gaussian')",
    )
    group.add_argument("--prior", default="point_normal", choices=sorted(PRIORS))
    group.add_argument("--max-iter", type=int, default=3000, help="passes over the data")
    group.add_argument("--batch-size", type=int, default=None, help="rows per step (minibatch)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    group.add_argument("--seed", type=int, default=0, help="random seed")


def _data_options(parser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--layer", default=None, help="fit adata.layers[NAME] (.h5ad input)")
    group.add_argument(
        "--mask-var", default=None, help="boolean column of var naming the genes to fit"
    )
    group.add_argument(
        "--n-top-features",
        type=int,
        default=None,
        metavar="N",
        help="fit the N genes of largest total count (when no --mask-var)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spfa", description="Variational sparse factor analysis of counts.")
    parser.add_argument("--version", action="version", version=f"spfa {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    fit = commands.add_parser("fit", help="fit a model; write the cells' loadings and factors")
    fit.add_argument("input", help=".h5ad, 10x directory, .npz or .csv/.tsv")
    fit.add_argument("--n-components", "-k", type=int, required=True, metavar="K")
    fit.add_argument("--output", "-o", required=True, help="an .h5ad file to write")
    _data_options(fit)
    _estimator_options(fit)
    fit.add_argument(
        "--covariates",
        nargs="+",
        default=None,
        metavar="COLUMN",
        help="columns of obs whose effects are fitted beside the factors (e.g. batch; "
        "categories are one-hot encoded)",
    )
    fit.add_argument(
        "--feature-groups",
        default=None,
        metavar="COLUMN",
        help="column of var naming each gene's view (e.g. feature_types) for a multi-view "
        "fit; give --likelihood VIEW=NAME per view",
    )
    fit.add_argument("--save-model", default=None, metavar="PATH", help="save the fitted model")
    fit.add_argument("--log-dir", default=None, help="write a TensorBoard run here")
    fit.add_argument("--quiet", "-q", action="store_true", help="no progress bar or log lines")

    tr = commands.add_parser("transform", help="loadings of new cells under a saved model")
    tr.add_argument("model", help="a model saved by spfa fit --save-model")
    tr.add_argument("input")
    tr.add_argument("--output", "-o", required=True, help="an .h5ad file to write")
    tr.add_argument("--layer", default=None)
    tr.add_argument("--quiet", "-q", action="store_true")

    info = commands.add_parser("info", help="what a saved model is")
    info.add_argument("model")

    top = commands.add_parser("top-features", help="the top genes of each factor")
    top.add_argument("model")
    top.add_argument("-n", "--n-top", type=int, default=10)
    top.add_argument("--min-pip", type=float, default=0.5)

    ck = commands.add_parser("choose-k", help="choose n_components by held-out likelihood")
    ck.add_argument("input")
    ck.add_argument("--candidates", type=int, nargs="+", required=True, metavar="K")
    _data_options(ck)
    _estimator_options(ck)
    ck.add_argument("--quiet", "-q", action="store_true")

    plot = commands.add_parser("plot", help="overview figure of a result written by spfa fit")
    plot.add_argument("result", help="an .h5ad file written by spfa fit")
    plot.add_argument("--output", "-o", required=True, help="figure file (.png, .pdf, .svg)")
    plot.add_argument("--groupby", default=None, help="column of obs that groups the cells")
    plot.add_argument("--key", default="spfa")
    return parser


# -------------------------------------------------------------------- helpers
def _read(path, **kw):
    from .io import read

    return read(path, **kw)


def _check_output(path: str, suffixes) -> Path:
    out = Path(path)
    if not out.name.lower().endswith(tuple(suffixes)):
        raise CommandError(f"--output {path}: expected a file ending in {' or '.join(suffixes)}")
    if not out.parent.exists():
        raise CommandError(f"--output {path}: directory {out.parent} does not exist")
    return out


def _gene_mask(adata, args):
    if args.mask_var is not None:
        return args.mask_var
    if args.n_top_features is not None:
        from .io import abundant_features

        if args.n_top_features < 1:
            raise CommandError("--n-top-features must be at least 1")
        from .anndata import layer_matrix

        return abundant_features(layer_matrix(adata, args.layer), args.n_top_features)
    return None


def _likelihood(args):
    """``--likelihood``: one name, or ``VIEW=NAME`` per view (a multi-view fit)."""
    from .likelihoods import LIKELIHOODS

    given = list(args.likelihood or ["poisson"])
    views = getattr(args, "feature_groups", None) is not None
    if not hasattr(args, "feature_groups") and (len(given) != 1 or "=" in given[0]):
        raise CommandError(f"spfa {args.command} fits one likelihood: give --likelihood once")
    if not views:
        if len(given) != 1 or "=" in given[0]:
            raise CommandError(
                "--likelihood takes one name (VIEW=NAME, once per view, needs --feature-groups)"
            )
        out = {"": given[0]}
    else:
        pairs = [item.partition("=") for item in given]
        if not all(sep and view and name for view, sep, name in pairs):
            raise CommandError("with --feature-groups, --likelihood takes VIEW=NAME per view")
        out = {view: name for view, _, name in pairs}
        if len(out) != len(pairs):
            raise CommandError("--likelihood names a view twice")
    for name in out.values():
        if name not in LIKELIHOODS:
            raise CommandError(
                f"unknown likelihood {name!r}; choose from {', '.join(sorted(LIKELIHOODS))}"
            )
    return out if views else out[""]


def _params(args) -> dict:
    return {
        "likelihood": _likelihood(args),
        "prior": args.prior,
        "max_iter": args.max_iter,
        "batch_size": args.batch_size,
        "device": args.device,
        "random_state": args.seed,
    }


def _is_h5ad(path) -> bool:
    return str(path).lower().endswith(".h5ad")


def _open_output(args, out: Path):
    """The input as an AnnData that :func:`_save` writes to ``out``: an ``.h5ad`` input is
    copied to ``out`` and opened there backed (its ``X`` is never loaded whole)."""
    if not _is_h5ad(args.input):
        return _read(args.input)
    source = Path(args.input)
    if not source.is_file():
        raise FileNotFoundError(2, "no such file", str(source))
    if out.exists() and out.resolve() == source.resolve():
        raise CommandError(f"--output {out} is the input file; write to another file")
    _read(source, backed=True).file.close()  # a corrupt file fails here, before the copy
    shutil.copyfile(source, out)
    return _read(out, backed="r+")


def _save(adata, out: Path) -> None:
    if adata.isbacked:
        adata.write()  # the new keys, into the backing file; X stays as it is
        adata.file.close()
    else:
        adata.write_h5ad(out)
    logger.info("wrote %s", out)


def _load(path):
    from .estimator import SparseFactorAnalysis

    return SparseFactorAnalysis.load(path)


# ------------------------------------------------------------------- commands
def _fit(args) -> None:
    from . import anndata as spfa_anndata

    out = _check_output(args.output, [".h5ad"])
    if args.save_model:
        _check_output(args.save_model, [""])
    adata = _open_output(args, out)
    mask = _gene_mask(adata, args)
    interrupted = None
    try:
        estimator = spfa_anndata.fit(
            adata,
            args.n_components,
            layer=args.layer,
            mask_var=mask,
            covariates=args.covariates,
            feature_groups=args.feature_groups,
            verbose=0 if args.quiet else 1,
            log_dir=args.log_dir,
            **_params(args),
        )
    except spfa_anndata.FitInterrupted as err:  # Ctrl-C: the fit so far is written, then stop
        estimator, interrupted = err.estimator, err
    _save(adata, out)
    if args.save_model:
        estimator.save(args.save_model)
        logger.info("saved the model to %s", args.save_model)
    if interrupted is not None:
        saved = f" and {args.save_model}" if args.save_model else ""
        raise KeyboardInterrupt(f"{interrupted.where}; wrote that fit to {out}{saved}")
    logger.info(
        "%d of %d factors kept; ELBO %.6g after %d passes",
        estimator.n_effective_components_,
        estimator.n_components,
        estimator.elbo_,
        estimator.n_iter_,
    )


def _transform(args) -> None:
    from . import anndata as spfa_anndata

    out = _check_output(args.output, [".h5ad"])
    estimator = _load(args.model)
    estimator.set_params(verbose=0 if args.quiet else 1)
    adata = _open_output(args, out)
    spfa_anndata.transform(adata, estimator, layer=args.layer)
    _save(adata, out)


def _info(args) -> None:
    est = _load(args.model)
    names = getattr(est, "feature_names_in_", None)
    rows = [
        ("likelihood", f"{est.likelihood} (link {est.link})"),
        ("prior", str(est.prior)),
        ("factors", f"{est.n_effective_components_} kept of {est.n_components}"),
        ("features", f"{est.n_features_in_}" + ("" if names is None else " (named)")),
        ("training cells", f"{est.loadings_.shape[0]}"),
        ("ELBO", f"{est.elbo_:.6g} after {est.n_iter_} passes"),
        ("ELBO contribution", " ".join(f"{c:.4g}" for c in est.elbo_contribution_)),
        ("device fitted on", str(est.device_)),
    ]
    if getattr(est, "feature_groups_", None) is not None:
        groups = [str(v) for v in est.feature_groups_]
        sizes = ", ".join(f"{v} ({groups.count(str(v))})" for v in est.view_names_)
        rows.insert(4, ("views (features)", sizes))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        _out(f"{name:<{width}}  {value}")


def _top_features(args) -> None:
    est = _load(args.model)
    records = est.top_features(args.n_top, min_pip=args.min_pip)
    _out("factor\trank\tfeature\tmean\tpip\tlfsr")
    for r in records:
        _out(
            f"{r['component'] + 1}\t{r['rank'] + 1}\t{r['feature']}\t{r['mean']:.4g}"
            f"\t{r['pip']:.3f}\t{r['lfsr']:.3g}"
        )


def _choose_k(args) -> None:
    from .anndata import counts
    from .estimator import SparseFactorAnalysis
    from .model_selection import choose_k

    adata = _read(args.input, backed=_is_h5ad(args.input))
    X, _ = counts(adata, layer=args.layer, mask_var=_gene_mask(adata, args))
    template = SparseFactorAnalysis(verbose=0 if args.quiet else 1, **_params(args))
    choice = choose_k(template, X, args.candidates, random_state=args.seed)
    _out("k\theld-out log-lik per entry\tfactors kept\tseconds")
    for row in choice.table:
        _out(f"{row['k']}\t{row['score']:.5f}\t{row['n_effective']}\t{row['seconds']:.1f}")
    _out(f"chosen k: {choice.k}")


def _plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from .plotting import plot_overview

    out = _check_output(args.output, [".png", ".pdf", ".svg"])
    adata = _read(args.result)
    figure = plot_overview(adata, key=args.key, groupby=args.groupby)
    figure.savefig(out, dpi=150, bbox_inches="tight")
    logger.info("wrote %s", out)


_COMMANDS = {
    "fit": _fit,
    "transform": _transform,
    "info": _info,
    "top-features": _top_features,
    "choose-k": _choose_k,
    "plot": _plot,
}


def _one_line(message) -> str:
    return " ".join(str(message).split())


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    handler = BarSafeHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("spfa: %(message)s"))
    root = logging.getLogger("spfa")
    old_level = root.level
    if not quiet:
        root.addHandler(handler)
        root.setLevel(logging.INFO)

    def show(message, category, *rest, **kw):
        sys.stderr.write(f"spfa: warning: {_one_line(message)}\n")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = show
            _COMMANDS[args.command](args)
    except BrokenPipeError:
        # the reader of stdout stopped early (``spfa top-features ... | head``): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CommandError, ValueError, OSError, ImportError, RuntimeError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        if isinstance(err, FileNotFoundError) and err.filename:
            message = f"{err.filename}: no such file or directory"
        sys.stderr.write(f"spfa: error: {_one_line(message)}\n")
        return 1
    except KeyboardInterrupt as err:
        detail = f": {_one_line(err.args[0])}" if err.args else ""
        sys.stderr.write(f"spfa: error: interrupted{detail}\n")
        return 130
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
