"""Data pipeline: corpora -> tokenizer -> cached token shards -> deterministic batches."""

from crosschip.data.corpus import (
    data_fingerprint,
    iter_documents,
    list_data_files,
    stdlib_docstring_corpus,
    unigram_entropy,
)
from crosschip.data.loader import PackedBatches, eval_batches
from crosschip.data.shards import TokenShards, build_shards
from crosschip.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer

__all__ = [
    "PackedBatches",
    "TokenShards",
    "build_shards",
    "data_fingerprint",
    "eval_batches",
    "iter_documents",
    "list_data_files",
    "load_tokenizer",
    "stdlib_docstring_corpus",
    "tokenizer_fingerprint",
    "train_tokenizer",
    "unigram_entropy",
]
