"""Data pipeline: raw sources -> cleaned, tokenized, packed shards -> mixed, resumable training batches."""

from data.sources import BadInputError, BadInputLog, Document, SourceError, iter_documents

__all__ = ["BadInputError", "BadInputLog", "Document", "SourceError", "iter_documents"]
