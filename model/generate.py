"""Autoregressive sampling for small models (greedy, temperature, top-k).

Each step recomputes the whole context (no KV cache): simple and exactly the training-time computation,
which is what evaluation of small CPU models needs. The context is cut to the last max_seq_len tokens.
"""

from __future__ import annotations

import torch

from ondol.model.transformer import Transformer


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, eos_id: int | None = None, generator: torch.Generator | None = None,
             min_new_tokens: int = 0) -> list[int]:
    """The new token ids (prompt excluded), stopping after eos_id when given. temperature 0 = greedy.
    eos cannot be chosen before min_new_tokens tokens (a small model often ends a prompt at once)."""
    if not prompt_ids:
        raise ValueError("generate: prompt_ids is empty; start from at least one token (e.g. the bos id)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            context = torch.tensor([ids[-model.cfg.max_seq_len:]], device=device)
            logits = model(context).logits[0, -1].float()
            if eos_id is not None and len(new) < min_new_tokens:
                logits[eos_id] = float("-inf")
            if temperature <= 0:
                token = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            ids.append(token)
            new.append(token)
            if eos_id is not None and token == eos_id:
                break
    finally:
        model.train(was_training)
    return new
