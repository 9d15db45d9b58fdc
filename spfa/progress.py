"""What a fit shows while it runs: a progress bar and spfa's log records on stderr.

``verbose`` maps to what is shown:

* ``0`` / ``False``: nothing (warnings still go through :mod:`warnings`);
* ``1`` / ``True``: a progress bar (:mod:`tqdm`) per fit or transform, with the
  ELBO per observed entry, and the ``"spfa"`` logger's INFO records (the start's
  repairs, pruning);
* ``2``: as 1, and DEBUG records (the ELBO and step size of every window).

The bar appears only once a fit has run for :data:`BAR_DELAY` seconds, so short
fits stay quiet. Library code only logs (logger ``"spfa"``); a handler is added
for the duration of a fit only when the application has configured none, and its
lines are written through the bar so that they do not break it.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from tqdm import tqdm

__all__ = ["BAR_DELAY", "BarSafeHandler", "ProgressBar", "log_level", "showing_logs", "verbosity"]

#: seconds a fit runs before its progress bar appears
BAR_DELAY = 1.0

_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


def verbosity(verbose) -> int:
    """``verbose`` (bool or int) as 0, 1 or 2; anything else is a ``ValueError``."""
    if isinstance(verbose, bool):
        return int(verbose)
    try:
        level = int(verbose)
    except (TypeError, ValueError):
        level = -1
    if level != verbose or level not in _LEVELS:
        raise ValueError(f"verbose must be False/True or 0, 1, 2; got {verbose!r}")
    return level


def log_level(verbose) -> int:
    """The ``logging`` level ``verbose`` shows."""
    return _LEVELS[verbosity(verbose)]


class BarSafeHandler(logging.StreamHandler):
    """Writes records through :func:`tqdm.write`, above any open bar."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def showing_logs(verbose):
    """Show the ``"spfa"`` logger's records at ``verbose``'s level on stderr while the
    block runs, unless the application configured logging itself."""
    level = verbosity(verbose)
    logger = logging.getLogger("spfa")
    if level == 0:
        yield
        return
    handler = None
    if not logging.getLogger().handlers and all(
        isinstance(h, logging.NullHandler) for h in logger.handlers
    ):
        handler = BarSafeHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[spfa] %(message)s"))
        logger.addHandler(handler)
    old = logger.level
    logger.setLevel(_LEVELS[level])
    try:
        yield
    finally:
        logger.setLevel(old)
        if handler is not None:
            logger.removeHandler(handler)


class ProgressBar:
    """A bar over a fit's passes, updated once per window of the stopping rule.

    Parameters
    ----------
    total : int
        Passes (full-batch steps) allowed, ``max_iter``.
    description : str
        Shown before the bar: ``"fit"``, ``"transform"``.
    verbose : bool or int
        No bar at 0.
    unit : str
    """

    def __init__(self, total: int, description: str, verbose, unit: str = "pass"):
        self._bar = None
        if verbosity(verbose) > 0:
            self._bar = tqdm(
                total=total,
                desc=f"spfa {description}",
                unit=unit,
                delay=BAR_DELAY,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
            )

    def __call__(self, done: int, elbo_per_entry: float) -> None:
        """``done`` passes so far; the window's mean ELBO per observed entry."""
        if self._bar is None:
            return
        self._bar.set_postfix_str(f"elbo/entry {elbo_per_entry:.4f}", refresh=False)
        self._bar.update(max(done - self._bar.n, 0))

    def close(self, message: str = "") -> None:
        """Close the bar; ``message`` (e.g. why it stopped) is logged at INFO."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if message:
            logging.getLogger("spfa").info(message)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
