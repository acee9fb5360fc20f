"""Next-token cross-entropy of the LM head, with full logits or chunk by chunk without them.

The full path materialises logits [N, V] and their fp32 copy (a 153,600 vocabulary at 8 x 4096 tokens: 20 GB).
The chunked path runs the head and the loss over `chunk` tokens at a time and computes the gradients of hidden
states and head weight right there in the forward pass, so no logits outlive their chunk; backward only scales
them by the incoming gradient. Same formula as `F.cross_entropy(logits.float(), labels, ignore_index=-100)`
(mean over labels that are not -100): chunking changes only the order of summation.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def full_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def _chunk_loss_and_grads(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, need_grads: bool):
    """Summed loss of one chunk and, with `need_grads`, that sum's gradients of h and weight (in their dtype;
    None without): the head matmul, the loss and both gradient matmuls, one compiled graph under train.compile."""
    logits = (h @ weight.t()).float()
    valid = labels != IGNORE
    target = labels.clamp_min(0)
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, target[:, None])[:, 0]) * valid).sum()
    if not need_grads:
        return loss, None, None
    grad = (logits - lse[:, None]).exp()  # softmax
    grad = (grad.scatter_add(1, target[:, None], -valid[:, None].to(grad.dtype)) * valid[:, None]).to(h.dtype)
    return loss, grad @ weight, grad.t() @ h


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _chunked(hidden, weight, labels, chunk: int, compiled: bool, need_grads: bool):
    """(mean loss, d(summed loss)/d(hidden), d(summed loss)/d(weight) in fp32), the gradients None without
    `need_grads`: then nothing of the size of hidden or weight is allocated."""
    step = _compiled(_chunk_loss_and_grads) if compiled else _chunk_loss_and_grads
    total = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_grads else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grads else None
    for start in range(0, hidden.shape[0], chunk):
        loss, grad_h, grad_w = step(hidden[start:start + chunk], weight, labels[start:start + chunk], need_grads)
        total += loss
        if need_grads:
            grad_hidden[start:start + chunk] = grad_h
            grad_weight += grad_w
    count = (labels != IGNORE).sum()  # a tensor: no host sync; 0 valid labels give nan, like F.cross_entropy
    return total / count, grad_hidden, grad_weight, count


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, compiled: bool):
        loss, grad_hidden, grad_weight, count = _chunked(hidden, weight, labels, chunk, compiled, need_grads=True)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype), count)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        return (grad_hidden * scale.to(grad_hidden.dtype), grad_weight * scale.to(grad_weight.dtype),
                None, None, None)


def lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor | None, chunk: int = 0,
            compiled: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(loss, logits) of the LM head on final hidden states. With labels and `chunk` > 0 the loss comes chunk
    by chunk and there are no logits; `compiled` runs the loss (or each chunk) through torch.compile."""
    if labels is not None and chunk:
        return chunked_linear_cross_entropy(hidden, head.weight, labels, chunk, compiled), None
    logits = head(hidden)
    if labels is None:
        return None, logits
    return (_compiled(full_cross_entropy) if compiled else full_cross_entropy)(logits, labels), logits


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                                 compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (hidden [..., D], weight [V, D], labels [...]) without logits.
    Gradients are built in the forward pass only when autograd will want them: not under torch.no_grad() or
    inference_mode (evaluation), where a [V, D] fp32 buffer would cost 3.8 GB at a 153,600 vocabulary."""
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk, compiled)
    return _chunked(hidden, weight, labels, chunk, compiled, need_grads=False)[0]
