"""Dynamic tokenization (work in progress): batch-level dynamic BPE, FVT / hypernetwork embeddings, encoder use.

Not registered as a plugin yet: decoder generation over an expanded vocabulary, recipes and the hook wiring are
still to come (issue 7). The modules are importable and tested.
"""

from .embeddings import EmbeddingCache, HyperNetwork, fvt_rows
from .merge import DynamicBatch, encode_batch, merge_batch, reduction, word_level_lengths

__all__ = ["DynamicBatch", "EmbeddingCache", "HyperNetwork", "encode_batch", "fvt_rows", "merge_batch", "reduction",
           "word_level_lengths"]
