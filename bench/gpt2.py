"""GPT-2 (random init, no download) with the adapter variants of the LoRA paper's Table 1.

Variants (TABLE1.md): the plain model (= fine-tuned = merged LoRA); AdapterH (Houlsby: an adapter
after attention and after the MLP, each before the residual add); AdapterL (Lin: one adapter after
the MLP, behind a LayerNorm); LoRA r=4 on Wq and Wv, unmerged, either through lora_kernels or as
PEFT-style unfused code. GPT-2 keeps Wq, Wk, Wv in one c_attn projection, so LoRA on Wq and Wv is
one rank-8 update of c_attn: A = [A_q; A_v] (8, d) and B = [[B_q, 0], [0, 0], [0, B_v]] (3d, 8),
exactly B_q·A_q·x on the q rows and B_v·A_v·x on the v rows (as loralib's MergedLinear does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_kernels import LoRALinear


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 24
    d_model: int = 1024
    n_head: int = 16
    vocab: int = 50257
    n_ctx: int = 1024


MEDIUM_CONFIG = GPT2Config()
REDUCED_CONFIG = GPT2Config(n_layer=2, d_model=128, n_head=4, vocab=1000, n_ctx=128)


class Adapter(nn.Module):
    """h + up(relu(down(norm(h)))): 2·d·b + b + d parameters (+2d with the LayerNorm)."""

    def __init__(self, d, bottleneck, layernorm=False, **factory):
        super().__init__()
        self.norm = nn.LayerNorm(d, **factory) if layernorm else nn.Identity()
        self.down = nn.Linear(d, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, d, **factory)

    def forward(self, h):
        return h + self.up(F.relu(self.down(self.norm(h))))


class UnfusedLoRA(nn.Module):
    """PEFT-style unmerged LoRA over the same tensors as a LoRALinear: three separate GEMMs."""

    def __init__(self, lora: LoRALinear):
        super().__init__()
        self.lora = lora

    def forward(self, x):
        m = self.lora
        return F.linear(x, m.weight, m.bias) + F.linear(F.linear(x, m.lora_A.weight), m.lora_B.weight) * m.scaling


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, adapter=None, bottleneck=0, **factory):
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d, **factory), nn.LayerNorm(d, **factory)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d, **factory), nn.Linear(d, d, **factory)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, **factory), nn.Linear(4 * d, d, **factory)
        self.adapter_attn = Adapter(d, bottleneck, **factory) if adapter == "H" else nn.Identity()
        self.adapter_mlp = Adapter(d, bottleneck, layernorm=adapter == "L", **factory) if adapter else nn.Identity()

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x):
        x = x + self.adapter_attn(self.attention(self.ln_1(x)))
        return x + self.adapter_mlp(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")))


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config, adapter=None, bottleneck=0, **factory):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model, **factory)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model, **factory)
        self.blocks = nn.ModuleList(Block(cfg, adapter, bottleneck, **factory) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, **factory)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied LM head


def add_lora_q_v(model: GPT2, r=4, alpha=8, fused=True):
    """LoRA rank r on Wq and Wv of every block, as one rank-2r update of c_attn (module docstring)."""
    for block in model.blocks:
        d = block.c_attn.in_features
        lora = LoRALinear.from_linear(block.c_attn, r=2 * r, alpha=alpha)
        lora.scaling = alpha / r  # each of the two adapters has rank r
        with torch.no_grad():
            nn.init.normal_(lora.lora_B.weight, std=0.02)  # a trained adapter, not the zero init
            lora.lora_B.weight[:d, r:] = 0
            lora.lora_B.weight[d : 2 * d] = 0
            lora.lora_B.weight[2 * d :, :r] = 0
        block.c_attn = lora if fused else UnfusedLoRA(lora)
    return model


def adapter_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "adapter" in n or "lora_" in n)
