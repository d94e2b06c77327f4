"""Feature-space identity: which fields of a shard manifest define the features a model was fitted on
(d, method, backbone, head, checkpoint sha256, preprocessing, normalisation, the PCA parameters'
hash) and which are provenance only (paths, row counts, dates). A fitted model stores
`feature_space(manifest)`; `assign` compares it field by field (`feature_space_mismatch`)."""

from __future__ import annotations

import hashlib
import json

# What an extractor record holds only as provenance: recorded in the manifest, never compared.
RECORD_ONLY = frozenset({"source", "checkpoint", "created", "rows", "path", "shards"})
# PCA provenance: the projection itself is identified by `params_sha256` (mean + components).
PCA_RECORD_ONLY = frozenset({"source_manifest_sha256", "params", "fit_rows", "seed", "explained_variance_ratio"})
FEATURE_SPACE_VERSION = 2  # 1: sha256 of d + the whole extractor block (paths included)


def feature_space(manifest: dict) -> dict:
    """The identity of a feature space: d and the extractor fields that define the features
    (method, backbone, head, checkpoint sha256, preprocessing, normalisation, PCA parameters'
    hash). Paths, row counts and dates are provenance: a model fitted on one image folder
    applies to features of another folder made by the same extractor."""
    extractor = dict(manifest.get("extractor") or {})
    space = {k: v for k, v in extractor.items() if k not in RECORD_ONLY}
    pca = space.get("pca")
    if isinstance(pca, dict):
        if "params_sha256" in pca:
            space["pca"] = {k: v for k, v in pca.items() if k not in PCA_RECORD_ONLY}
        else:  # written before the parameters were hashed: everything but the provenance
            space["pca"] = {k: v for k, v in pca.items() if k not in ("source_manifest_sha256", "params")}
    return {"d": manifest.get("d"), **space}


def feature_space_hash(manifest: dict) -> str:
    """sha256 of `feature_space(manifest)`: what a fitted model records and `assign` compares."""
    key = json.dumps(feature_space(manifest), sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()


def legacy_feature_space_hash(manifest: dict) -> str:
    """The version-1 hash (d + the whole extractor block, paths included); models written with it
    keep loading: `feature_space_mismatch` accepts either hash for them."""
    key = json.dumps({"d": manifest.get("d"), "extractor": manifest.get("extractor", {})}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def feature_space_mismatch(model_space: dict | None, model_hash: str | None, manifest: dict) -> str | None:
    """Why features described by `manifest` do not belong to a model's feature space, or None.

    A model that stores its feature-space block is compared field by field and the message names
    every differing field; a model that stores only a hash (version 1) matches shards whose new
    or legacy hash equals it. A model with neither (fitted on an array) accepts any shards."""
    space = feature_space(manifest)
    if model_space is not None:
        diff = sorted(k for k in set(space) | set(model_space) if space.get(k) != model_space.get(k))
        if not diff:
            return None
        shown = "; ".join(f"{k}: model {_short(model_space.get(k))}, shards {_short(space.get(k))}" for k in diff)
        return f"feature space differs in {', '.join(diff)} ({shown})"
    if model_hash is None or model_hash in (feature_space_hash(manifest), legacy_feature_space_hash(manifest)):
        return None
    return (f"feature space hash {feature_space_hash(manifest)[:12]} differs from the model's {model_hash[:12]} "
            "(the model predates field-level feature spaces, so the differing field is not known)")


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
