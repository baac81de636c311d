"""Data pipeline: corpora -> tokenizer -> token datasets (datatrove) -> deterministic batches.

`crosschip.data.tokenize` (datatrove's readers and tokenizer: ~1 s to import) is imported where it is used.
"""

from crosschip.data.corpus import (
    data_fingerprint,
    iter_documents,
    list_data_files,
    stdlib_docstring_corpus,
    unigram_entropy,
)
from crosschip.data.dataset import TokenDataset, TokenStream, is_dataset, open_dataset
from crosschip.data.loader import PackedBatches, eval_batches
from crosschip.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer

__all__ = [
    "PackedBatches",
    "TokenDataset",
    "TokenStream",
    "data_fingerprint",
    "eval_batches",
    "iter_documents",
    "is_dataset",
    "list_data_files",
    "load_tokenizer",
    "open_dataset",
    "stdlib_docstring_corpus",
    "tokenizer_fingerprint",
    "train_tokenizer",
    "unigram_entropy",
]
