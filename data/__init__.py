"""Data pipeline: raw sources -> cleaned, tokenized, packed shards -> mixed, resumable training batches.

`sources` reads raw text, `clean` filters and deduplicates it, `preparation.prepare` tokenizes it into packed
shards (`shards`), and `loader.TokenLoader` serves mixture-weighted batches from them. Importing the package
imports none of these, so reading configs stays light.
"""
