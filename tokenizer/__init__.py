"""Korean-first tokenizer: lossless SentencePiece training, encoding, HF export and evaluation."""

from tokenizer.tokenizer import Tokenizer
from tokenizer.train import train_tokenizer

__all__ = ["Tokenizer", "train_tokenizer"]
