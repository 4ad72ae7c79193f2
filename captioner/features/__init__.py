"""Encoder features, computed once: in memory for one run, or in a shared on-disk cache.

loading.py   images to pixels in worker processes (a bad file never stops a batch)
encoding.py  pixels to features: the frozen encoder, run once per image
cache.py     the on-disk cache (fp16 arrays + an index by image identity), filled batch by batch
items.py     per-item decoder inputs (images, or image sequences) gathered from per-image features
"""

from .cache import CachedFeatures, FeatureCache, encoder_key, image_identity
from .encoding import compute_dtype, encode_pixels, extract_features, pool
from .items import ItemFeatures, corpus_features
from .loading import LoadImage, default_workers, prepared_batches, split_batch

__all__ = [
    "FeatureCache",
    "CachedFeatures",
    "ItemFeatures",
    "LoadImage",
    "compute_dtype",
    "corpus_features",
    "default_workers",
    "encode_pixels",
    "encoder_key",
    "extract_features",
    "image_identity",
    "pool",
    "prepared_batches",
    "split_batch",
]
