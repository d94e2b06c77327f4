"""The one feature validator: shape, dtype, row count and non-finite rows, with messages that name
the source and the rows. Every reader and writer of features calls these."""

from __future__ import annotations

import numpy as np


def nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Indices (m,) of the rows of x (n, d) that hold NaN or Inf."""
    return np.flatnonzero(~np.isfinite(x).all(axis=1))


def nonfinite_message(x: np.ndarray, source: str) -> str | None:
    """'SOURCE: row R contains NaN or Inf (M bad row(s) in all: [...])', or None when every row is finite."""
    bad = nonfinite_rows(x)
    if not bad.size:
        return None
    shown = f"{bad[:10].tolist()}{'...' if bad.size > 10 else ''}"
    return f"{source}: row {int(bad[0])} contains NaN or Inf ({bad.size} bad row(s) in all: {shown})"


def check_features(x, source: str, min_rows: int = 1, error: type[Exception] = ValueError) -> np.ndarray:
    """Validate a feature matrix (n, d): 2-D, numeric, d >= 1, at least `min_rows` rows, every value
    finite. Raises `error` with a message naming `source`, the rows and what was expected."""
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise error(f"{source}: expected a 2-D array (n_samples, n_features), got shape {getattr(x, 'shape', None)}")
    if not np.issubdtype(x.dtype, np.number):
        raise error(f"{source}: expected numeric features, got dtype {x.dtype}")
    n, d = x.shape
    if d < 1:
        raise error(f"{source}: features have dimension 0")
    if n < min_rows:
        raise error(f"{source}: {n} row(s); at least {min_rows} are needed")
    message = nonfinite_message(x, source)
    if message is not None:
        raise error(message)
    return x


def dimension_message(model_d: int, data_d: int, source: str) -> str | None:
    """'SOURCE: the model expects d=M features, the data has d=N', or None when they agree."""
    if data_d == model_d:
        return None
    return f"{source}: the model expects d={model_d} features, the data has d={data_d}"


def check_model_features(x: np.ndarray, n_features: int, source: str, error: type[Exception] = ValueError,
                         model: str = "this model") -> np.ndarray:
    """The one "(n, d) for this model" check: x must be 2-D with `n_features` columns; raises `error`
    'SOURCE: expected an (n, D) array for MODEL (d=D), got shape S'."""
    if np.ndim(x) != 2 or x.shape[1] != n_features:
        raise error(f"{source}: expected an (n, {n_features}) array for {model} (d={n_features}), "
                    f"got shape {tuple(np.shape(x))}")
    return x
