"""Quickstart, notebook style: cluster an array you already have, look at K, assign new rows, save the
model for the CLI. Runs as a script (`python examples/quickstart.py`) and in the test suite.

Each `# %%` block is a notebook cell.
"""

# %% make data: 5 Gaussian clusters in 8 dimensions (any (n, d) float array works)
import tempfile

import numpy as np

from cluster_service import DeepDPM
from cluster_service.datasets import make_mixture

X, y = make_mixture(4000, 8, 5, seed=0)
X_train, X_new = X[:3000], X[3000:]

# %% fit: K is inferred, nothing to guess
est = DeepDPM(random_state=0).fit(X_train)
print(f"K found: {est.n_clusters_}, cluster sizes: {np.bincount(est.labels_).tolist()}")

# %% new rows: hard labels, probabilities, log-density (low = unlike anything seen in training)
labels = est.predict(X_new)
proba = est.predict_proba(X_new)
print(f"new rows: {len(labels)}, mean max-probability {proba.max(1).mean():.3f}, "
      f"mean log-density {est.score_samples(X_new).mean():.2f}")

# %% score against the labels we happen to have (never used for fitting)
from sklearn.metrics import normalized_mutual_info_score  # noqa: E402 - a notebook cell

print(f"NMI on new rows: {normalized_mutual_info_score(y[3000:], labels):.3f}")

# %% save: the same model directory as `cluster-service fit` writes; `cluster-service assign` takes it
model_dir = tempfile.mkdtemp(prefix="quickstart-") + "/model"
est.save(model_dir)
again = DeepDPM.load(model_dir)
assert (again.predict(X_new) == labels).all()
print(f"saved to {model_dir}")
