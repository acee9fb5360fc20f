"""Mixture-of-experts layer: token-choice top-k router, dropless sorted dispatch, grouped expert matmuls.

The layer runs in three separable steps so that expert parallelism or faster kernels can replace one step alone:
  route    (scores, bias-corrected top-k selection, normalised and scaled weights; fp32)
  dispatch (sort the N*k token copies by expert -> `GroupedExperts` on contiguous groups -> unsort, weighted sum)
  balance  (loads returned in the stats, added to `tokens_per_expert` by `count_load` outside the block;
           `update_bias` moves `expert_bias`, outside autograd)
Routing matches transformers' ExaoneMoeTopkRouter (n_group = 1): the bias only changes which experts are
chosen; weights come from the unbiased scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ondol.model.config import ModelConfig
from ondol.model.layers import SwiGLU


@dataclass
class Routing:
    weights: torch.Tensor  # [N, k] combine weights (fp32)
    experts: torch.Tensor  # [N, k] chosen expert ids
    scores: torch.Tensor  # [N, E] unbiased router scores (fp32)
    logits: torch.Tensor  # [N, E] router logits (fp32)


def route(logits: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig) -> Routing:
    """Top-k token-choice routing from fp32 router logits [N, E]."""
    scores = logits.sigmoid() if cfg.router_score == "sigmoid" else logits.softmax(dim=-1)
    experts = torch.topk(scores + bias, k=cfg.top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if cfg.norm_topk:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(weights * cfg.routed_scaling, experts, scores, logits)


def expert_counts(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Token copies per expert [E] (int64) from chosen ids [N, k]. A scatter-add into E bins has a fixed output
    size, so unlike `torch.bincount` (whose size depends on the data) it never waits for the GPU."""
    ids = experts.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


class Router(nn.Module):
    """Router logits in fp32 (its own module so that ZeRO-3 gathers its weight when it runs)."""

    def __init__(self, dim: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights (transformers' layout: gate_up_proj [E, 2I, D], down_proj [E, D, I]),
    applied to tokens already sorted by expert, `counts[e]` tokens for expert e. `first_expert`: the layer-wide
    id of expert 0 here (non-zero for an expert-parallel slice; initialisation is seeded by expert id)."""

    def __init__(self, n_experts: int, dim: int, hidden: int, dispatch: str, first_expert: int = 0) -> None:
        super().__init__()
        self.first_expert = first_expert
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.dispatch = dispatch

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        impl = self.dispatch if self.dispatch != "auto" else auto_dispatch(x, counts.numel())
        if impl == "loop" and torch.compiler.is_compiling():  # the loop's shapes depend on the routing
            impl = "gather"
        return {"grouped_mm": self._grouped_mm, "loop": self._loop, "bmm_padded": self._bmm_padded,
                "gather": self._gather}[impl](x, counts)

    @staticmethod
    def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _grouped_mm(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = _ContiguousGrad.apply(torch._grouped_mm(x, self.gate_up_proj.transpose(1, 2), offs=offs))
        return _ContiguousGrad.apply(torch._grouped_mm(self._swiglu(h), self.down_proj.transpose(1, 2), offs=offs))

    def _loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # unbind, not indexing: indexing's backward writes a full-size zero gradient per expert
        experts = zip(self.gate_up_proj.unbind(0), self.down_proj.unbind(0), x.split(counts.tolist()))
        outs = [F.linear(self._swiglu(F.linear(xe, w1)), w2) for w1, w2, xe in experts if xe.shape[0]]
        return torch.cat(outs) if outs else x.new_zeros(0, self.down_proj.shape[1])

    def _gather(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each row through its own expert's gathered weights: fixed shapes, so one compiled graph serves every
        decoding step, touching only the chosen experts (the loop's shapes depend on the routing)."""
        expert_of = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts,
                                            output_size=x.shape[0])
        h = torch.bmm(self.gate_up_proj[expert_of], x.unsqueeze(-1)).squeeze(-1)
        return torch.bmm(self.down_proj[expert_of], self._swiglu(h).unsqueeze(-1)).squeeze(-1)

    def _bmm_padded(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Pad every group to the largest one and run one batched matmul per projection.

        Computed transposed (W @ x^T) so that weight gradients come out in the parameters' own layout: the
        other orientation makes autograd copy every expert weight gradient once more (~25% of the time)."""
        E, cap = counts.shape[0], int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        expert_of = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=x.shape[0])
        slot = torch.arange(x.shape[0], device=x.device) - starts[expert_of]
        padded = x.new_zeros(E, cap, x.shape[1]).index_put((expert_of, slot), x)
        gate, up = torch.bmm(self.gate_up_proj, padded.transpose(1, 2)).chunk(2, dim=1)  # [E, I, cap] each
        return torch.bmm(self.down_proj, F.silu(gate) * up).transpose(1, 2)[expert_of, slot]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: torch's CPU grouped_mm backward rejects the
    stride-0 gradients that e.g. `.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def auto_dispatch(x: torch.Tensor, n_experts: int = 0) -> str:
    """grouped_mm on Hopper+ CUDA in bf16 (its fast kernel); elsewhere bmm_padded, except without autograd for
    at most one token copy per expert (KV-cached decoding), where the loop touches only the chosen experts and
    padding would run all of them (10-30% faster per decoded token on the tiny preset). With autograd the path
    never depends on the local token count: under expert parallelism a rank whose loop got no rows would give
    its experts no gradient and desynchronise DeepSpeed's reductions. On CPU torch's grouped_mm works
    (fp32/bf16) but its speed swings with core contention (from a tie to 2x slower than bmm_padded on the tiny
    preset), so there it is opt-in (model.moe_dispatch=grouped_mm); see benchmarks/model_fwd_bwd.py."""
    if (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9):
        return "grouped_mm"
    decoding = not torch.is_grad_enabled() and x.shape[0] <= n_experts
    return "loop" if decoding else "bmm_padded"


class MoE(nn.Module):
    """Routed experts plus always-on shared experts (ExaoneMoeSparseMoEBlock semantics)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg.d_model, cfg.n_experts)
        self.experts = GroupedExperts(cfg.n_experts, cfg.d_model, cfg.expert_hidden, cfg.moe_dispatch)
        self.shared_experts = (SwiGLU(cfg.d_model, cfg.expert_hidden * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x [B, T, D] -> (output [B, T, D], stats: aux_loss (weighted), and detached logging values)."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        r = route(self.gate(flat), self.expert_bias, self.cfg)
        counts = expert_counts(r.experts, self.cfg.n_experts)
        out = self.combine(flat, r, counts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        stats = self.losses(r, counts, B, T)
        stats["load"] = counts  # for count_load, called by whoever runs the block
        return out.view(B, T, D), stats

    @torch.no_grad()
    def count_load(self, load: torch.Tensor) -> None:
        """Add a forward's expert loads (its stats["load"]) to `tokens_per_expert`, in training only. Called
        outside the block, on the block's returned stats: an activation-checkpoint recompute returns nothing,
        so each forward counts exactly once, and the compiled block has no side effect to break its graph."""
        if self.training:
            self.tokens_per_expert += load.float()

    def combine(self, flat: torch.Tensor, r: Routing, counts: torch.Tensor) -> torch.Tensor:
        """Sort token copies by expert, run the experts, unsort and sum with the routing weights."""
        k = self.cfg.top_k
        order = torch.argsort(r.experts.flatten(), stable=True)
        y_sorted = self.experts(flat[order // k], counts)
        y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted).view(-1, k, flat.shape[1])
        return (y * r.weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)

    def losses(self, r: Routing, counts: torch.Tensor, B: int, T: int) -> dict[str, torch.Tensor]:
        cfg, E = self.cfg, self.cfg.n_experts
        aux = r.logits.new_zeros(())
        stats = {}
        if cfg.aux_loss_coef > 0:  # DeepSeek-V3 sequence-wise balance loss
            chosen = F.one_hot(r.experts, E).sum(1).view(B, T, E).float()
            f = chosen.sum(1) * E / (cfg.top_k * T)  # [B, E]
            p = (r.scores / r.scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)
            seq_aux = (f * p).sum(-1).mean()
            aux = aux + cfg.aux_loss_coef * seq_aux
            stats["seq_aux_loss"] = seq_aux.detach()
        if cfg.z_loss_coef > 0:
            z = torch.logsumexp(r.logits, dim=-1).pow(2).mean()
            aux = aux + cfg.z_loss_coef * z
            stats["z_loss"] = z.detach()
        load = counts.float()
        stats["max_violation"] = ((load.max() - load.mean()) / load.mean()).detach()
        stats["aux_loss"] = aux
        return stats

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts, lower over-loaded ones."""
        load = self.tokens_per_expert  # all zero (e.g. no tokens seen): sign(0) = 0 leaves the bias as it is
        if self.cfg.bias_update_rate > 0:
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()
