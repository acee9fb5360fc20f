"""Korean-first tokenizer: lossless SentencePiece training (`train`), encoding (`tokenizer.Tokenizer`), HF export
(`hf_export`) and evaluation beside other tokenizers (`evaluate`)."""
