"""Data pipeline: raw sources -> cleaned, tokenized, packed shards -> mixed, resumable training batches."""

from data.preparation import prepare
from data.shards import first_documents, read_manifest
from data.sources import BadInputError, BadInputLog, Document, SourceError, iter_documents

__all__ = ["BadInputError", "BadInputLog", "Document", "SourceError", "TokenLoader", "first_documents",
           "iter_documents", "prepare", "read_manifest"]


def __getattr__(name: str):
    """TokenLoader is imported on first use, so reading configs does not import torch."""
    if name == "TokenLoader":
        from data.loader import TokenLoader

        return TokenLoader
    raise AttributeError(f"module 'data' has no attribute '{name}'")
