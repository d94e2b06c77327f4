"""Images → MoCo v2 ResNet-50 features → Parquet feature shards (the contract in cluster_service.io.shards).

    moco.py     the encoder and the official MoCo checkpoint format
    extract.py  the Ray Data extraction job, and optional PCA of the written shards
"""

from feature_extraction.extract import ExtractConfig, ExtractReport, apply_pca, extract, list_images
from feature_extraction.moco import CheckpointError, MoCoEncoder, load_encoder

__all__ = ["CheckpointError", "ExtractConfig", "ExtractReport", "MoCoEncoder", "apply_pca", "extract",
           "list_images", "load_encoder"]
