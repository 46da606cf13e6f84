"""Dynamic tokenization ("Retrofitting (Large) Language Models with Dynamic Tokenization", ACL 2025).

Batch-level dynamic BPE (:mod:`.merge`), FVT / hypernetwork rows for the merged tokens (:mod:`.embeddings`,
trained by :mod:`.hypertrain`), encoder use through a backbone hook (:mod:`.encoder`), decoder prefill and
generation over an expanded vocabulary with an ANN index (:mod:`.decoder`), the plugin (:mod:`.plugin`) and its
tasks ``dyntok_hypernet`` / ``dyntok_generate`` (:mod:`.tasks`).
"""

from .config import DynamicTokenizationConfig
from .embeddings import EmbeddingCache, HyperNetwork, fvt_rows, load_hypernet, save_hypernet
from .merge import DynamicBatch, encode_batch, encode_ids, merge_batch, reduction, word_level_lengths
from .plugin import DynamicTokenizationPlugin

__all__ = ["DynamicBatch", "DynamicTokenizationConfig", "DynamicTokenizationPlugin", "EmbeddingCache", "HyperNetwork",
           "encode_batch", "encode_ids", "fvt_rows", "load_hypernet", "merge_batch", "reduction", "save_hypernet",
           "word_level_lengths"]
