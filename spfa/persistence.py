"""Save and load fitted estimators in a format that cannot run code on load.

A file is one ``torch.save`` archive of a plain dictionary holding only
tensors, strings and numbers, read back with ``torch.load(weights_only=True)``,
whose restricted unpickler refuses any other object (so a crafted file cannot
execute code). Its entries:

* ``format``: ``"spfa"``; ``format_version``: an integer bumped whenever the
  layout changes; ``spfa_version`` and ``torch_version`` of the writer;
* ``params``: the constructor arguments, as JSON;
* ``attributes``: the fitted scalars, strings, feature names and history, as JSON;
* ``arrays``: the fitted numpy arrays, as CPU tensors (dtype kept);
* ``state``: the torch module's parameters and buffers (the estimator's
  ``state_dict_``), as CPU tensors.

Tensors are always stored on the CPU, so a model fitted on a GPU loads on a
machine without one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ._validation import resolve_device
from ._version import __version__

__all__ = ["FORMAT_VERSION", "save_estimator", "load_estimator"]

#: 2: zero-inflated and zero-truncated likelihoods keep their base's parameters
#: under ``likelihood.base.`` (format 1 files are read and migrated)
FORMAT_VERSION = 2
_MAGIC = "spfa"
_STATE = "state_dict_"


def _encode_params(estimator) -> dict:
    params = estimator.get_params(deep=False)
    for name in ("likelihood", "link"):
        value = params[name]
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            continue  # one registered name per view
        if not isinstance(value, str):
            raise ValueError(
                f"cannot save an estimator whose {name} is a {type(params[name]).__name__} "
                "instance: only registered names are stored (a custom class would have to be "
                "imported, i.e. run, on load); register it and pass its name"
            )
    rs = params["random_state"]
    if not (rs is None or isinstance(rs, (int, np.integer))):
        params["random_state"] = None  # a RandomState's stream is not stored
    elif rs is not None:
        params["random_state"] = int(rs)
    if params["log_dir"] is not None:
        params["log_dir"] = str(params["log_dir"])
    params["device"] = str(params["device"])
    return params


def _encode_attributes(estimator) -> tuple[dict, dict]:
    """Split the fitted attributes into JSON-able values and arrays."""
    meta, arrays = {}, {}
    for name, value in vars(estimator).items():
        if not name.endswith("_") or name.startswith("__") or name == _STATE:
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            arrays[name] = torch.from_numpy(np.ascontiguousarray(value))
        elif isinstance(value, np.ndarray) and value.dtype.kind in "OU":
            meta[name] = {"strings": [str(v) for v in value]}
        elif isinstance(value, torch.device):
            meta[name] = {"device": str(value)}
        elif isinstance(value, (np.floating, np.integer, np.bool_)):
            meta[name] = {"value": value.item()}
        elif value is None or isinstance(value, (bool, int, float, str, dict, list)):
            meta[name] = {"value": value}
        else:
            raise ValueError(f"cannot save attribute {name} of type {type(value).__name__}")
    return meta, arrays


def save_estimator(estimator, path) -> None:
    """Write a fitted estimator to ``path`` (see the module docstring).

    The file is written to a temporary name and moved into place, so an
    interrupted save never leaves a truncated file under ``path``.
    """
    payload = {
        "format": _MAGIC,
        "format_version": FORMAT_VERSION,
        "spfa_version": __version__,
        "torch_version": str(torch.__version__),
        "params": json.dumps(_encode_params(estimator)),
    }
    meta, arrays = _encode_attributes(estimator)
    payload["attributes"] = json.dumps(meta)
    payload["arrays"] = arrays
    payload["state"] = {k: v.detach().cpu().clone() for k, v in getattr(estimator, _STATE).items()}
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()  # write through the link to its target; the link stays
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory", str(path))
    # a short temporary name beside the target (a 255-byte name leaves no room to extend
    # it), written, synced to disk, then renamed over the target in one step
    fd, tmp = tempfile.mkstemp(prefix=".spfa-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else _new_file_mode())
        os.replace(tmp, path)
        _sync_directory(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _new_file_mode() -> int:
    """The mode a new file gets under the process's umask (mkstemp's is always 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _sync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:  # noqa: BLE001 - any failure to parse means the same thing
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path} is not a readable spfa model: the file is corrupt, truncated, not written "
            f"by SparseFactorAnalysis.save, or holds objects that are not allowed ({reason})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != _MAGIC:
        raise ValueError(f"{path} is not an spfa model file (no 'format': 'spfa' entry)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by spfa {payload.get('spfa_version')} in file format "
            f"{version!r}; this spfa ({__version__}) reads formats up to {FORMAT_VERSION}. "
            "Upgrade spfa to load it."
        )
    missing = {"params", "attributes", "arrays", "state"} - set(payload)
    if missing:
        raise ValueError(f"{path} is an incomplete spfa model file: no {sorted(missing)}")
    return payload


def load_estimator(cls, path, device="cpu"):
    """Read an estimator written by :func:`save_estimator`; see ``cls.load``.

    Anything in the file that a save would not have written -- wrong types, unknown
    parameters or attribute names, out-of-range parameters, a non-finite model state --
    is a ``ValueError`` naming it.
    """
    payload = _read(path)
    try:
        return _build(cls, payload, path, device)
    except (TypeError, KeyError, AttributeError, IndexError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path}: malformed spfa model file ({type(err).__name__}: {err})"
        ) from err


def _check_attribute_name(cls, name, params, path) -> None:
    """Only names a fit sets: public identifiers ending in ``_``, none that would shadow
    a method, property or parameter of the class."""
    ok = (
        isinstance(name, str)
        and name.isidentifier()
        and name.endswith("_")
        and not name.startswith("_")
        and not hasattr(cls, name)
        and name not in params
    )
    if not ok:
        raise ValueError(f"{path}: not a fitted attribute name: {name!r}")


def _build(cls, payload, path, device):
    try:
        params = json.loads(payload["params"])
        meta = json.loads(payload["attributes"])
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: corrupt metadata ({err})") from err
    if not isinstance(params, dict) or not isinstance(meta, dict):
        raise ValueError(f"{path}: corrupt metadata (params and attributes must be objects)")
    unknown = set(params) - set(cls().get_params(deep=False))
    if unknown:
        raise ValueError(
            f"{path} has parameters {sorted(unknown)} that this spfa ({__version__}) does not "
            f"know; it was written by spfa {payload.get('spfa_version')}"
        )
    target = resolve_device(device)
    params["device"] = str(target)
    estimator = cls(**params)
    try:
        estimator._settings(target)  # every parameter in range, as fit would check
        views = isinstance(params["likelihood"], dict) and isinstance(meta, dict)
        groups = meta.get("feature_groups_", {}) if views else {}
        estimator._make_likelihood(groups.get("strings"))  # a view fit: over its views
    except ValueError as err:
        raise ValueError(f"{path}: invalid parameters ({err})") from err
    arrays, state = payload["arrays"], payload["state"]
    if not isinstance(arrays, dict) or not isinstance(state, dict):
        raise ValueError(f"{path}: corrupt file (arrays and state must be dictionaries)")
    for name, entry in meta.items():
        _check_attribute_name(cls, name, params, path)
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"{path}: corrupt entry for attribute {name!r}")
        if "strings" in entry:
            value = np.asarray([str(v) for v in entry["strings"]], dtype=object)
        elif "device" in entry:
            value = target
        else:
            value = entry["value"]
        setattr(estimator, name, value)
    for name, tensor in arrays.items():
        _check_attribute_name(cls, name, params, path)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: attribute {name!r} is not an array")
        setattr(estimator, name, tensor.numpy())
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: corrupt model state entry {key!r}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: the model state {key!r} is not finite")
    state = dict(state)
    if payload["format_version"] < 2:
        state = _migrate_state_1(state, params.get("likelihood"))
    setattr(estimator, _STATE, state)
    estimator._n_features_out = estimator.n_components
    try:
        estimator.get_model()
    except (KeyError, RuntimeError, ValueError, AttributeError, TypeError) as err:
        raise ValueError(f"{path}: the stored model is inconsistent ({err})") from err
    return estimator


#: registered likelihoods that became wrappers in format 2, and their own parameters
_WRAPPED = {"zinb": ("zero_logit",), "zt_poisson": (), "zt_negative_binomial": ()}


def _migrate_state_1(state: dict, likelihood) -> dict:
    """Format 1 -> 2: a wrapper's base parameters move under ``likelihood.base.``."""
    if likelihood not in _WRAPPED:
        return state
    own = {f"likelihood.{name}" for name in _WRAPPED[likelihood]}
    out = {}
    for key, value in state.items():
        if key.startswith("likelihood.") and key not in own:
            key = "likelihood.base." + key[len("likelihood.") :]
        out[key] = value
    return out
