"""
Multi-token prediction (MTP), sequential as in DeepSeek-V3 (arXiv:2412.19437, §2.2).

D modules (config.mtp_depth) extend the main model's prediction one more token each,
keeping the causal chain: module k sees the representation of module k-1 at position i
and the embedding of token t_{i+k}, and predicts t_{i+k+1}. With h^0 the main model's
final hidden state:

    h'^k_i = M_k [ RMSNorm(h^{k-1}_i) ; RMSNorm(Emb(t_{i+k})) ]      M_k: Linear(2C, C)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                                 one causal Transformer block
    P^k_{i+k+1} = OutHead(h^k_i)                                      the main lm_head, softcapped
    L^k = CE(P^k, t) over the valid targets;   L = L_main + (lambda / D) sum_k L^k

Emb and OutHead are the main model's wte and lm_head (shared, not copied). The norms are
parameter-free (nanochat's), so feeding the post-final-norm trunk output is the same as
feeding the pre-norm one. TRM_k is gpt.Block with full-context attention.

Indexing with nanochat's tensors (targets[:, i] = idx[:, i+1], -1 = ignore): module k
works on positions i < T-k, reads its input token t_{i+k} from idx[:, k:] (every input
token is known there, also where the main target is masked, so a -1 never indexes wte
and a masked target does not hide the MTP target after it), and its target t_{i+k+1}
is targets[:, k:]. Only the last k positions of each row, whose target lies past the
row, are dropped. Each L^k is normalised by its own count of valid targets.

Used only for the training loss: inference (forward without targets, the engine,
decode_step) never runs it. Speculative decoding with it is issue 20's item 3.
"""

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import Context, norm


class MTP(nn.Module):
    def __init__(self, config):
        super().__init__()
        from nanochat.gpt import Block, LayerSpec  # gpt imports this module
        C, D = config.n_embd, config.mtp_depth
        if D < 1:
            raise ValueError(f"mtp_depth={D}: must be a positive number of MTP modules")
        self.proj = nn.ModuleList(nn.Linear(2 * C, C, bias=False) for _ in range(D))  # M_k
        spec = LayerSpec("attn", config.sequence_len)
        plain = dataclasses.replace(config, mhc=False)  # the modules run on the reduced hidden state, one stream
        self.blocks = nn.ModuleList(Block(plain, config.n_layer + k, spec) for k in range(D))  # TRM_k

    @torch.no_grad()
    def init_weights(self):
        """M_k uniform with std 1/sqrt(2C): its input is two unit-rms halves, so h' starts
        at unit rms (a zero M_k would feed RMSNorm zeros, whose gradient blows up). The
        blocks' attention and MLP are modules of the mixer contract: GPT.init_weights and
        opt_tags reach them on their own."""
        for proj in self.proj:
            bound = math.sqrt(3) / math.sqrt(proj.in_features)
            nn.init.uniform_(proj.weight, -bound, bound)

    def opt_tags(self):
        return {f"proj.{k}.weight": "muon" for k in range(len(self.proj))}

    def flops_per_token(self, T, lm_head_weights):
        """Training FLOPs per token (counted over all T positions, though module k runs
        on T-k): M_k, the block, and one more lm_head pass per module."""
        return sum(6 * p.weight.numel() + b.mixer.flops_per_token(T) + 6 * sum(q.numel() for q in b.mlp.parameters())
                   + 6 * lm_head_weights for p, b in zip(self.proj, self.blocks))

    def forward(self, h, idx, targets, wte, logits, cos, sin, reduction="mean", run_block=None):
        """(1/D) sum_k L^k. h: (B, T, C) the main model's final hidden state; wte, logits:
        the main model's embedding and its softcapped head (a function of hidden states);
        cos, sin: the rotary tables of positions 0..T-1. reduction "mean": each L^k is
        the mean over its valid targets (0 when it has none); "sum": their sum.
        run_block(block, h, ctx): how the main model runs a block (GPT.run_block, which
        checkpoints it under gradient checkpointing); default: block(h, ctx)."""
        T = idx.size(1)
        total = torch.zeros((), device=h.device)
        for k, (proj, block) in enumerate(zip(self.proj, self.blocks), start=1):
            n = T - k
            if n <= 0:
                break
            e = norm(wte(idx[:, k:])).to(h.dtype)                # t_{i+k}, i < T-k
            h = proj(torch.cat([norm(h[:, :n]), e], dim=-1))    # h'^k
            ctx = Context(cos[:, :n], sin[:, :n], 0, n, {})
            h = block(h, ctx) if run_block is None else run_block(block, h, ctx)
            z = logits(norm(h))
            target = targets[:, k:]                              # t_{i+k+1}
            ce = F.cross_entropy(z.reshape(-1, z.size(-1)), target.reshape(-1), ignore_index=-1, reduction="sum")
            total = total + (ce if reduction == "sum" else ce / (target >= 0).sum().clamp(min=1))
        return total / len(self.blocks)
