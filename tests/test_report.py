"""The run report's per-cluster label composition (report.html); the whole report of a labelled fit is
checked in tests/test_cli.py and the image galleries in tests/test_imagenet.py."""

from __future__ import annotations

import numpy as np

from cluster_service.io.shards import write_shards
from cluster_service.report.html import _panel, data_column, label_composition


def test_label_composition_gives_the_majority_label_and_purity_of_the_known_labels():
    n_known, top = label_composition(np.array([2, 2, 1, -1, 2, 0]))
    assert n_known == 5 and top == [(2, 3), (0, 1), (1, 1)]  # -1 (unknown) counts for nothing
    body = _panel(0, np.array([6]), np.zeros(6), [], None, {}, (n_known, top))
    assert "majority label 2, purity 60.0% (2: 60.0%, 0: 20.0%, 1: 20.0% of 5 labelled rows)" in body
    assert "labels: none known" in _panel(0, np.array([2]), np.zeros(2), [], None, {}, label_composition(-np.ones(2)))


def test_labels_are_joined_to_the_assignment_rows_by_id(tmp_path):
    ids = np.array([10, 11, 12, 13, 14])
    write_shards(tmp_path / "shards", ids, np.zeros((5, 2), np.float32), np.array([0, 1, 2, 3, 4]), rows_per_shard=2)
    got = data_column(str(tmp_path / "shards"), np.array([14, 10, 99, 12]), "label")
    assert got.tolist() == [4, 0, -1, 2]  # 99: not in the data
    assert data_column(str(tmp_path / "shards"), ids, "path") is None  # no image paths in these shards
    np.savez(tmp_path / "x.npz", X=np.zeros((3, 2)), y=[5, 6, 7])
    assert data_column(str(tmp_path / "x.npz"), np.array([2, 0]), "label").tolist() == [7, 5]
