"""Autoregressive sampling for small models (greedy, temperature, top-k), with a KV cache.

The prompt is processed once; each new token then costs one position (model/kv_cache.py; sliding-window layers
keep only their window). Once the sequence outgrows max_seq_len the context is the last max_seq_len tokens,
re-encoded from position 0 for every token, exactly as an uncached model sees it.

`speculative=True` (greedy only) drafts one token with the model's first MTP depth and verifies it with the
main model in the same forward as the token before it: the output is the greedy output, and every accepted
draft saves one main-model step.
"""

from __future__ import annotations

import torch

from ondol.model.kv_cache import StaticKVCache
from ondol.model.transformer import Transformer


class Picker:
    """The next token from a logits row: greedy or sampled, eos forbidden before min_new_tokens."""

    def __init__(self, temperature: float, top_k: int, eos_id: int | None, min_new_tokens: int,
                 generator: torch.Generator | None) -> None:
        self.temperature, self.top_k, self.eos_id = temperature, top_k, eos_id
        self.min_new_tokens, self.generator = min_new_tokens, generator

    def __call__(self, logits: torch.Tensor, n_new: int) -> int:
        logits = logits.float()
        if self.eos_id is not None and n_new < self.min_new_tokens:
            logits = logits.clone()
            logits[self.eos_id] = float("-inf")
        if self.temperature <= 0:
            return int(logits.argmax())
        logits = logits / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=self.generator))

    def done(self, new: list[int], max_new_tokens: int) -> bool:
        return len(new) >= max_new_tokens or (self.eos_id is not None and new[-1] == self.eos_id)


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, eos_id: int | None = None, generator: torch.Generator | None = None,
             min_new_tokens: int = 0, use_cache: bool = True, speculative: bool = False,
             compile: bool = False, stats: dict | None = None) -> list[int]:
    """The new token ids (prompt excluded), stopping after eos_id when given. temperature 0 = greedy.
    eos cannot be chosen before min_new_tokens tokens (a small model often ends a prompt at once).
    use_cache=False recomputes the whole context for every token (the reference the cache is tested against).
    compile=True decodes with a fixed-shape cache and one torch.compile'd graph per model for the one-token step
    (the first call compiles: tens of seconds on CPU); the tokens are those of the eager cache.
    `stats`, when given, receives the main-model forward count and, when speculative, drafted/accepted counts."""
    if not prompt_ids:
        raise ValueError("generate: prompt_ids is empty; start from at least one token (e.g. the bos id)")
    if speculative and (temperature > 0 or not model.cfg.mtp_layers):
        raise ValueError("generate.speculative=true needs greedy decoding (generate.temperature=0) and a model "
                         "trained with model.mtp_layers >= 1")
    pick = Picker(temperature, top_k, eos_id, min_new_tokens, generator)
    stats = {} if stats is None else stats
    stats.update(forwards=0, drafted=0, accepted=0)
    was_training = model.training
    model.eval()
    try:
        if max_new_tokens <= 0:
            return []
        if speculative and len(prompt_ids) + max_new_tokens + 1 <= model.cfg.max_seq_len:
            return _speculative(model, list(prompt_ids), max_new_tokens, pick, stats)
        if compile and use_cache and len(prompt_ids) + max_new_tokens <= model.cfg.max_seq_len:
            return _compiled_sample(model, list(prompt_ids), max_new_tokens, pick, stats)
        return _sample(model, list(prompt_ids), max_new_tokens, pick, use_cache, stats)
    finally:
        model.train(was_training)


def _sample(model: Transformer, ids: list[int], max_new_tokens: int, pick: Picker, use_cache: bool,
            stats: dict) -> list[int]:
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    cache, fed, new = None, 0, []  # fed: tokens of `ids` the cache holds
    while True:
        if use_cache and len(ids) <= max_len:
            if cache is None:
                cache, _ = model.new_cache()
            logits = model(torch.tensor([ids[fed:]], device=device), cache=cache).logits[0, -1]
            fed = len(ids)
        else:
            logits = model(torch.tensor([ids[-max_len:]], device=device)).logits[0, -1]
        stats["forwards"] += 1
        new.append(pick(logits, len(new)))
        ids.append(new[-1])
        if pick.done(new, max_new_tokens):
            return new


def _decode_step(model: Transformer, token: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    return model(token, cache=cache).logits[0, -1]


_compiled_decode_step = torch.compile(_decode_step, fullgraph=True, dynamic=False)


def _compiled_sample(model: Transformer, ids: list[int], max_new_tokens: int, pick: Picker, stats: dict
                     ) -> list[int]:
    """Cached sampling whose one-token steps run compiled over a StaticKVCache (the prompt runs eagerly)."""
    device = next(model.parameters()).device
    cache = model.new_static_cache(next(model.parameters()).dtype)
    logits = model(torch.tensor([ids], device=device), cache=cache).logits[0, -1]
    new = []
    while True:
        stats["forwards"] += 1
        new.append(pick(logits, len(new)))
        if pick.done(new, max_new_tokens):
            return new
        logits = _compiled_decode_step(model, torch.tensor([new[-1:]], device=device), cache)


def _speculative(model: Transformer, ids: list[int], max_new_tokens: int, pick: Picker, stats: dict
                 ) -> list[int]:
    """Greedy decoding that verifies one MTP draft per main-model forward.

    Invariant at the top of the loop: the main cache holds every token but the last, `token` (accepted, not yet
    fed); the MTP cache holds the same positions; `draft` is the MTP guess for the token after `token`.
    """
    device = next(model.parameters()).device
    as_ids = lambda toks: torch.tensor([toks], device=device)
    main_cache, mtp_cache = model.new_cache(slack=1)
    out = model(as_ids(ids), cache=main_cache)
    stats["forwards"] += 1
    new = [pick(out.logits[0, -1], 0)]
    if pick.done(new, max_new_tokens):
        return new
    draft = int(model.mtp_draft(out.hidden, as_ids(ids[1:] + new), mtp_cache).argmax())
    while True:
        token = new[-1]
        out = model(as_ids([token, draft]), cache=main_cache)
        stats["forwards"] += 1
        stats["drafted"] += 1
        new.append(pick(out.logits[0, 0], len(new)))
        if new[-1] != draft:  # rejected: forget the draft's position, continue from the verified token
            main_cache.crop(1)
            if pick.done(new, max_new_tokens):
                return new
            draft = int(model.mtp_draft(out.hidden[:, :1], as_ids(new[-1:]), mtp_cache).argmax())
            continue
        stats["accepted"] += 1
        if pick.done(new, max_new_tokens):
            return new
        new.append(pick(out.logits[0, 1], len(new)))  # the verify forward also gave the token after the draft
        if pick.done(new, max_new_tokens):
            return new
        draft = int(model.mtp_draft(out.hidden, as_ids(new[-2:]), mtp_cache).argmax())
