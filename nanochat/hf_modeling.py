"""
The model file that `scripts.export_hf --remote_code` ships beside the weights, for the
models transformers' own NanoChat class cannot express: our attention and MLP plus the
quality recipe's value embeddings, smear gate, backout, per-layer resid/x0 scalars, QK
scale and sliding windows (the nanochat 2026 model; nanochat/gpt.py and attention.py are
the reference, tests/test_hf.py checks the logits against them). Loaded with
AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True). It imports nothing of
nanochat, so it runs wherever torch and transformers do. No KV cache: generate() runs the
whole sequence each step (fine for trying a model; serve it with our chat_web for speed).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class NanoChatRecipeConfig(PretrainedConfig):
    """`nanochat`: our GPTConfig as a dict, plus the per-layer plan ("windows",
    "value_embed_layers") and the padded vocabulary ("rows") that the export computed."""
    model_type = "nanochat_recipe"

    def __init__(self, nanochat=None, **kwargs):
        self.nanochat = nanochat or {}
        super().__init__(**kwargs)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary(x, cos, sin):
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, c, value_embed):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = c["n_head"], c["n_kv_head"], c["n_embd"] // c["n_head"]
        C, D = c["n_embd"], self.head_dim
        self.c_q = nn.Linear(C, self.n_head * D, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_proj = nn.Linear(self.n_head * D, C, bias=False)
        self.qk_scale = c["qk_scale"]
        self.has_ve = value_embed
        if value_embed:
            self.ve = nn.Embedding(c["rows"], self.n_kv_head * D)
            self.ve_gate = nn.Linear(12, self.n_kv_head, bias=False)

    def forward(self, x, idx, cos, sin, mask):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.has_ve:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :12]))
            v = v + gate.unsqueeze(-1).to(v.dtype) * self.ve(idx).view_as(v).to(v.dtype)
        q, k = norm(rotary(q, cos, sin)), norm(rotary(k, cos, sin))
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.c_fc = nn.Linear(C, 4 * C, bias=False)
        self.c_proj = nn.Linear(4 * C, C, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, c, value_embed):
        super().__init__()
        self.mixer = Attention(c, value_embed)
        self.mlp = MLP(c["n_embd"])

    def forward(self, x, idx, cos, sin, mask):
        x = x + self.mixer(norm(x), idx, cos, sin, mask)
        return x + self.mlp(norm(x))


class NanoChatRecipeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoChatRecipeConfig
    base_model_prefix = "nanochat"
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        c = config.nanochat
        C, L = c["n_embd"], c["n_layer"]
        self.wte = nn.Embedding(c["rows"], C)
        self.blocks = nn.ModuleList(Block(c, i in c["value_embed_layers"]) for i in range(L))
        self.lm_head = nn.Linear(C, c["rows"], bias=False)
        if c["smear"]:
            self.smear_gate = nn.Linear(24, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if c["backout"]:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        if c["layer_lambdas"]:
            self.resid_lambdas = nn.Parameter(torch.ones(L))
            self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            # padded rows would attend to their pads at shifted positions: refuse, not answer wrong
            raise ValueError("this model takes no padding (attention_mask has zeros): run one sequence a call, "
                             "or batch sequences of equal length")
        c, idx = self.config.nanochat, input_ids
        B, T = idx.shape
        D = c["n_embd"] // c["n_head"]
        inv_freq = 1.0 / c["rope_base"] ** (torch.arange(0, D, 2, dtype=torch.float32, device=idx.device) / D)
        angles = torch.outer(torch.arange(T, dtype=torch.float32, device=idx.device), inv_freq)
        cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
        pos = torch.arange(T, device=idx.device)
        masks = {w: (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < w) for w in set(c["windows"])}
        x = norm(self.wte(idx))
        if c["smear"]:
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :24]))
            x = x + gate * F.pad(x[:, :-1], (0, 0, 1, 0))
        x0, mid = x, None
        for i, block in enumerate(self.blocks):
            if c["layer_lambdas"]:
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            x = block(x, idx, cos, sin, masks[c["windows"][i]])
            if i == c["n_layer"] // 2:
                mid = x
        if c["backout"]:
            x = x - self.backout_lambda.to(x.dtype) * mid
        logits = self.lm_head(norm(x))[..., :c["vocab_size"]].float()
        logits = c["softcap"] * torch.tanh(logits / c["softcap"])
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}  # no KV cache: the whole sequence every step
