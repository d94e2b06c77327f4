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
