"""GLM-4 decoder, read top to bottom: norm -> rotary -> attention -> MLP -> block -> model.

Numerically it is ``transformers.GlmForCausalLM`` (``Glm4ForCausalLM`` with ``post_norms``); the one layout
difference is a fused ``qkv_proj`` (one matmul instead of three), split back apart by ``pretrain/hf.py``.

Each op (RMSNorm and the residual add + RMSNorm, SwiGLU, rotary, attention, LM head + cross-entropy) is
chosen when the model is built, from a ``KernelConfig`` (``GLM(config, kernels=...)``): the plain PyTorch
functions in this file (the default, and the reference every kernel is tested against), or the Triton kernels
of ``glmwb.kernels`` (imported only when chosen). The positions reach the rotary op explicitly (``Rope``).

Shapes: B batch, T new tokens, S keys (cached + new), D hidden, H query heads, K key/value heads,
hd head dim, R rotary dims (the first R of each head), V vocabulary.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from glmwb.kernels.config import KernelConfig, check_triton_can_run
from glmwb.pretrain.config import GLMConfig

IGNORE_INDEX = -100


def _kernel_op(module: str, name: str) -> Callable:
    """``glmwb.kernels.<module>.<name>``, imported when a model chooses it (Triton need not be installed)."""
    return getattr(importlib.import_module(f"glmwb.kernels.{module}"), name)


# ----------------------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y = weight * (x / sqrt(mean(x^2) + eps)); the variance in fp32, rounded to the input dtype before the
    weight multiply, exactly as ``GlmRMSNorm`` (so bf16 outputs match Hugging Face bit for bit)."""
    input_dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(input_dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """A block's residual add and the norm after it: (rms_norm(residual + x), residual + x)."""
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


class RMSNorm(nn.Module):
    """``rms_norm`` with a learned weight; ``forward(x, residual)`` also adds the residual first and returns
    the sum too (one pass over the rows with the Triton kernel: ``kernels.rmsnorm.rmsnorm_add``)."""

    def __init__(self, dim: int, eps: float, kernel: str = "torch") -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernel = kernel
        if kernel == "triton":
            self.norm_fn = _kernel_op("rmsnorm", "rmsnorm")
            self.add_norm_fn = _kernel_op("rmsnorm", "rmsnorm_add")
        else:
            self.norm_fn, self.add_norm_fn = rms_norm, add_rms_norm

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if residual is None:
            return self.norm_fn(x, self.weight, self.eps)
        return self.add_norm_fn(x, residual, self.weight, self.eps)  # (normed, residual + x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, kernel={self.kernel}"


# ----------------------------------------------------------------------------------------------------------
# Rotary embeddings: partial (first R dims of each head) and interleaved (GPT-J pairs (x0, x1), (x2, x3), ...)


def rotary_cos_sin(
    position_ids: Tensor, rotary_dim: int, theta: float, dtype: torch.dtype, factor: float = 1.0
) -> tuple[Tensor, Tensor]:
    """cos / sin of the R/2 frequencies at each position, computed in fp32 then cast; each (B, T, R/2).

    inv_freq_i = theta^(-2i / R), i = 0 .. R/2 - 1 (the same float ops as Hugging Face's default rope),
    divided by ``factor`` > 1 for position interpolation (Hugging Face's "linear" rope)."""
    exponents = torch.arange(0, rotary_dim, 2, device=position_ids.device).float() / rotary_dim  # (R/2,)
    inv_freq = 1.0 / theta**exponents  # (R/2,)
    if factor != 1.0:
        inv_freq = inv_freq / factor
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, R/2)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each interleaved pair (x_2i, x_2i+1) of the first R dims by angle pos * inv_freq_i.

    x: (B, T, N, hd) tokens-first; cos, sin: (B, T, R/2). The pair rotation is
        (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)
    i.e. Hugging Face's ``x * cos_interleaved + rotate_half(x) * sin_interleaved`` with
    ``rotate_half(x) = stack(-x[1::2], x[0::2]).flatten(-2)``, done on a (R/2, 2) view with no interleaving.
    Dims R .. hd - 1 pass through unchanged. (split / unbind rather than slicing: their backward is one cat
    / stack instead of a zero-filled tensor per slice.)
    """
    rotary_dim = 2 * cos.shape[-1]
    x_rot, x_pass = x.split((rotary_dim, x.shape[-1] - rotary_dim), dim=-1)  # (B, T, N, R), (B, T, N, hd - R)
    x0, x1 = x_rot.unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, N, R/2) each
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, R/2)
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)  # (B, T, N, R/2, 2)
    return torch.cat((rotated.flatten(-2), x_pass), dim=-1)  # (B, T, N, hd)


@dataclass
class Rope:
    """What every layer's rotary op takes in one forward: the positions (B | 1, T) and, made from them once,
    either the cos / sin of their angles (B | 1, T, R/2) in the activation dtype (PyTorch rotary) or
    inv_freq (R/2,) in fp32 (the Triton rotary makes the angles itself, in fp32, from the positions)."""

    positions: Tensor
    cos: Tensor | None = None
    sin: Tensor | None = None
    inv_freq: Tensor | None = None


def rope_cos_sin(
    position_ids: Tensor, rotary_dim: int, theta: float, dtype: torch.dtype, factor: float = 1.0
) -> Rope:
    cos, sin = rotary_cos_sin(position_ids, rotary_dim, theta, dtype, factor)
    return Rope(position_ids, cos=cos, sin=sin)


def rope_inv_freq(
    position_ids: Tensor, rotary_dim: int, theta: float, dtype: torch.dtype, factor: float = 1.0
) -> Rope:
    from glmwb.kernels.rotary import rotary_inv_freq

    inv_freq = rotary_inv_freq(rotary_dim, theta, device=position_ids.device)
    return Rope(position_ids, inv_freq=inv_freq / factor if factor != 1.0 else inv_freq)


def qkv_rotary(
    qkv_proj: nn.Module, x: Tensor, rope: Rope, num_heads: int, num_kv_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Project x (B, T, D) to q, k, v (B, T, H | K | K, hd) token-major, q and k rotated by ``apply_rotary``."""
    B, T, _ = x.shape
    H, K = num_heads, num_kv_heads
    qkv = qkv_proj(x).view(B, T, H + 2 * K, -1)  # (B, T, H + 2K, hd)
    qk, v = qkv.split((H + K, K), dim=2)  # (B, T, H + K, hd), (B, T, K, hd)
    q, k = apply_rotary(qk, rope.cos, rope.sin).split((H, K), dim=2)  # q and k rotate in one pass
    return q, k, v


def qkv_rotary_triton(
    qkv_proj: nn.Module, x: Tensor, rope: Rope, num_heads: int, num_kv_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``qkv_rotary`` with the Triton rotary, in place on the projection's output: it reads and writes only
    the rotating half of each q / k head (``kernels.rotary.apply_rotary_qkv_``)."""
    from glmwb.kernels.rotary import apply_rotary_qkv_

    B, T, D = x.shape
    H, K = num_heads, num_kv_heads
    # A Linear on 2-D input returns a fresh tensor (on 3-D input, a view, and an in-place op on a view makes
    # autograd copy the whole gradient to rebase it)
    qkv = qkv_proj(x.reshape(B * T, D))  # (B * T, (H + 2K) * hd)
    if qkv._base is not None:  # a wrapper returned a view: rotating it in place would copy more
        qkv = qkv.clone(memory_format=torch.contiguous_format)
    qkv = apply_rotary_qkv_(qkv, rope.positions, rope.inv_freq, H, K).view(B, T, H + 2 * K, -1)
    q, k, v = qkv.split((H, K, K), dim=2)  # (B, T, H | K | K, hd) views
    return q, k, v


# per ``KernelConfig.rotary``: what the model makes from the positions once per forward, and what each layer
# does with it
ROPE_INPUTS = {"torch": rope_cos_sin, "triton": rope_inv_freq}
QKV_ROTARY = {"torch": qkv_rotary, "triton": qkv_rotary_triton}


# ----------------------------------------------------------------------------------------------------------
# KV cache (generation)


class KVCache:
    """Preallocated keys and values, per layer (B, K, max_len, hd); ``length`` positions are filled.

    The model writes the new keys / values of every layer at ``length`` and advances ``length`` once the
    whole forward is done. Padding is not stored here: pass the full (B, length + T) attention mask.
    """

    def __init__(
        self,
        config: GLMConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, K, T, hd) after the cached positions; return every key / value (B, K, S, hd)."""
        start, end = self.length, self.length + k.shape[2]
        if k.device != self.keys[layer_idx].device:
            raise ValueError(
                f"KVCache: the cache is on {self.keys[layer_idx].device} but the model's keys are on {k.device}; "
                f"build it with KVCache(..., device={str(k.device)!r})"
            )
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} positions do not fit in max_len={self.max_len}")
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reset(self) -> None:
        self.length = 0


# ----------------------------------------------------------------------------------------------------------
# Attention masks and positions (built once per forward, shared by all layers)


def doc_position_ids(doc_ids: Tensor) -> Tensor:
    """Positions that restart at 0 where the document id changes: doc_ids (B, T) -> (B, T)."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    doc_start = torch.where(starts, idx, 0).cummax(dim=-1).values  # (B, T) index of the current doc's start
    return idx - doc_start


def build_attention_mask(
    num_new: int, past: int, doc_ids: Tensor | None, attention_mask: Tensor | None, device: torch.device
) -> Tensor:
    """Boolean mask (B or 1, 1, T, S), True = may attend: causal, same document, key not padding.

    A padding query would see no key at all (a NaN softmax), so every query may always see itself.
    """
    q_pos = torch.arange(past, past + num_new, device=device)  # (T,)
    k_pos = torch.arange(past + num_new, device=device)  # (S,)
    mask = (k_pos[None, :] <= q_pos[:, None])[None]  # (1, T, S)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, :].bool()  # (B, T, S)
        mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
    return mask[:, None]  # (B, 1, T, S)


# ----------------------------------------------------------------------------------------------------------
# Attention


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """PyTorch SDPA on token-major q (B, T, H, hd), k / v (B, S, K, hd); returns (B, T, H, hd)."""
    H, K = q.shape[2], k.shape[2]
    # heads-first views for SDPA; kept token-major in memory, so SDPA's output is too and the reshape
    # back to (B, T, H * hd) after it is free
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H | K, T | S, hd)
    enable_gqa = H != K
    if enable_gqa and attn_mask is not None and q.device.type != "cpu":
        # as transformers does: CUDA's kernels that take a mask do not take enable_gqa (only the slow math
        # one would), so share the kv heads explicitly; query head h reads kv head h // (H / K)
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # (B, H, S, hd)
        enable_gqa = False
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa
    )  # (B, H, T, hd)
    return y.transpose(1, 2)  # (B, T, H, hd)


def dispatch_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, *, backend: str
) -> Tensor:
    """``kernels.attention.attention``: flash-attn where it can run (``backend`` auto / flash_attn), else SDPA."""
    from glmwb.kernels.attention import attention

    return attention(q, k, v, causal=is_causal, attn_mask=attn_mask, backend=backend)  # (B, T, H, hd)


def attention_op(choice: str) -> Callable:
    """The attention function for a ``KernelConfig.attention`` choice."""
    return sdpa_attention if choice == "torch" else functools.partial(dispatch_attention, backend=choice)


class Attention(nn.Module):
    """Grouped-query attention with a fused q/k/v projection (bias = attention_bias) and no o_proj bias."""

    def __init__(self, config: GLMConfig, layer_idx: int, kernels: KernelConfig | None = None) -> None:
        super().__init__()
        kernels = kernels or KernelConfig.all_torch()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        qkv_dim = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.rotary_kernel, self.attention_kernel = kernels.rotary, kernels.attention
        self.qkv_fn = QKV_ROTARY[kernels.rotary]
        self.attention_fn = attention_op(kernels.attention)

    def forward(
        self,
        x: Tensor,
        rope: Rope,
        attn_mask: Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_fn(self.qkv_proj, x, rope, self.num_heads, self.num_kv_heads)  # (B, T, H | K, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k.transpose(1, 2), v.transpose(1, 2))  # (B, K, S, hd)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, S, K, hd) views
        y = self.attention_fn(q, k, v, attn_mask, is_causal)  # (B, T, H, hd)
        return self.o_proj(y.reshape(B, T, self.num_heads * self.head_dim))  # (B, T, D)

    def extra_repr(self) -> str:
        return f"rotary={self.rotary_kernel}, attention={self.attention_kernel}"


# ----------------------------------------------------------------------------------------------------------
# MLP


def swiglu(gate_up: Tensor) -> Tensor:
    """up * silu(gate) from the fused gate_up_proj output (..., 2I), gate first; returns (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)  # (B, T, I) each
    return up * F.silu(gate)


class MLP(nn.Module):
    """SwiGLU: down(up * silu(gate)) with a fused gate_up_proj, gate first; no biases."""

    def __init__(self, config: GLMConfig, kernel: str = "torch") -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.kernel = kernel
        self.swiglu_fn = _kernel_op("swiglu", "swiglu") if kernel == "triton" else swiglu

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.swiglu_fn(self.gate_up_proj(x)))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"


# ----------------------------------------------------------------------------------------------------------
# Block


class Block(nn.Module):
    """Pre-norm residual block; with ``post_norms`` (glm4) each sublayer's output is normed again before
    the residual add: x + post_norm(sublayer(norm(x)))."""

    def __init__(self, config: GLMConfig, layer_idx: int, kernels: KernelConfig | None = None) -> None:
        super().__init__()
        kernels = kernels or KernelConfig.all_torch()
        dim, eps, norm_kernel = config.hidden_size, config.rms_norm_eps, kernels.rmsnorm
        self.attn_norm = RMSNorm(dim, eps, norm_kernel)
        self.attn = Attention(config, layer_idx, kernels)
        self.mlp_norm = RMSNorm(dim, eps, norm_kernel)
        self.mlp = MLP(config, kernels.swiglu)
        if config.post_norms:
            self.post_attn_norm = RMSNorm(dim, eps, norm_kernel)
            self.post_mlp_norm = RMSNorm(dim, eps, norm_kernel)
        else:
            self.post_attn_norm = self.post_mlp_norm = None

    def forward(
        self,
        x: Tensor,
        rope: Rope,
        attn_mask: Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        h = self.attn(self.attn_norm(x), rope, attn_mask, is_causal, kv_cache)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        normed, x = self.mlp_norm(h, residual=x)  # mlp_norm(x + h), x + h
        h = self.mlp(normed)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


# ----------------------------------------------------------------------------------------------------------
# Model


@dataclass
class GLMOutput:
    logits: Tensor | None  # (B, T, V) in the model's (or autocast's) dtype
    loss: Tensor | None  # scalar, fp32


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over rows whose target is not -100, in fp32, in row chunks.

    loss = (1/n) sum_{r valid} (logsumexp(z_r) - z_r[y_r]);  dloss/dz_r = (softmax(z_r) - onehot(y_r)) / n.
    Same value as ``F.cross_entropy(z.float(), y, ignore_index=-100)``, but neither pass materialises a
    full-size fp32 copy or log-softmax of the logits: the forward keeps one logsumexp per row, and the
    backward writes the gradient chunk by chunk into one tensor of the logits' dtype.
    """

    @staticmethod
    def chunk_rows(logits: Tensor) -> int:
        """Rows per chunk: fp32 temporaries of 16 MB on a CPU (cache-sized), 256 MB on a GPU (few launches)"""
        elements = 1 << 22 if logits.device.type == "cpu" else 1 << 26
        return max(1, elements // logits.shape[-1])

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:  # logits (N, V), targets (N,)
        rows = CrossEntropy.chunk_rows(logits)
        valid = targets != IGNORE_INDEX  # (N,)
        safe_targets = torch.where(valid, targets, 0)  # (N,)
        lse = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(rows)])  # (N,)
        target_logits = logits.gather(-1, safe_targets[:, None]).squeeze(-1).float()  # (N,)
        num_valid = valid.sum().clamp(min=1)
        ctx.save_for_backward(logits, lse, safe_targets, valid, num_valid)
        return ((lse - target_logits) * valid).sum() / num_valid

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None]:
        logits, lse, safe_targets, valid, num_valid = ctx.saved_tensors
        rows = CrossEntropy.chunk_rows(logits)
        scale = (grad_loss / num_valid * valid)[:, None]  # (N, 1): 0 on ignored rows
        grad = torch.empty_like(logits)  # (N, V)
        chunks = (t.split(rows) for t in (grad, logits, lse, scale, safe_targets))
        for g, z, m, s, y in zip(*chunks, strict=True):
            p = g if g.dtype == torch.float32 else torch.empty_like(g, dtype=torch.float32)  # (rows, V)
            torch.sub(z, m[:, None], out=p).exp_().mul_(s).scatter_add_(-1, y[:, None], -s)  # softmax * scale
            if p is not g:
                g.copy_(p)
        return grad, None


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy in fp32: mean over t with labels[:, t+1] != -100 of
    -log softmax(logits[:, t])[labels[:, t+1]]. logits (B, T, V), labels (B, T) unshifted.

    The labels are shifted (and padded with -100) instead of slicing the logits, which avoids a copy of
    the largest activation. Returns 0 (not NaN) when every label is ignored.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    return CrossEntropy.apply(logits.flatten(0, 1), targets.flatten())


def fused_causal_lm_loss(hidden: Tensor, lm_head: nn.Linear, labels: Tensor) -> Tensor:
    """``causal_lm_loss(lm_head(hidden), labels)`` by the Triton fused LM head + cross-entropy
    (``kernels.fused_linear_ce``): the (B, T, V) logits never exist. hidden (B, T, D), labels (B, T)."""
    from glmwb.kernels.fused_linear_ce import fused_linear_cross_entropy

    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    return fused_linear_cross_entropy(
        hidden, lm_head.weight, targets, lm_head.bias, ignore_index=IGNORE_INDEX
    )


class GLM(nn.Module):
    """GLM-4 causal LM: embedding -> blocks -> final norm -> untied lm_head.

    ``kernels``: which implementation each op uses (``None``: the plain PyTorch functions of this file);
    the choice changes no parameter, so a state dict loads into a model built with any choice.
    """

    def __init__(self, config: GLMConfig, kernels: KernelConfig | None = None) -> None:
        super().__init__()
        kernels = kernels or KernelConfig.all_torch()
        if kernels.uses_triton():
            check_triton_can_run("GLM")
        self.config = config
        self.kernels = kernels
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i, kernels) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels.rmsnorm)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_fn = ROPE_INPUTS[kernels.rotary]
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, initializer_range) for matrices, zero biases, ones for norms; the projections that write into
        the residual stream (o_proj, down_proj) scaled by 1 / sqrt(2 * num_layers) (GPT-2)."""
        std = self.config.initializer_range
        if isinstance(module, Attention | MLP):
            out = module.o_proj if isinstance(module, Attention) else module.down_proj
            # apply() visits children first, so this overrides the plain init of that Linear
            nn.init.normal_(out.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_layers))
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` leaves out the token embedding (the untied lm_head counts)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if non_embedding else n

    def hidden_states(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        doc_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Final-norm hidden states (B, T, D).

        input_ids (B, T). doc_ids (B, T): packed documents; a token sees only earlier tokens of its own doc,
        and positions restart at 0 per doc unless position_ids are given. attention_mask (B, past + T): 1 for
        tokens, 0 for padding (left padding for batched generation); positions default to its cumsum - 1.
        kv_cache: attend to the cached keys / values too, and append this step's.
        """
        B, T = input_ids.shape
        device = input_ids.device
        past = 0 if kv_cache is None else kv_cache.length
        if doc_ids is not None and kv_cache is not None:
            raise ValueError("GLM: doc_ids (packed training) cannot be combined with a kv_cache")
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                got = tuple(attention_mask.shape)
                raise ValueError(f"GLM: attention_mask must be (B, past + T) = {(B, past + T)}, got {got}")
            if bool(attention_mask.all()):  # (a host sync; pass no mask when there is no padding)
                attention_mask = None  # no padding: keep SDPA's fast causal path

        if position_ids is None:
            if doc_ids is not None:
                position_ids = doc_position_ids(doc_ids)  # (B, T)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=device)[None]  # (1, T)

        if doc_ids is None and attention_mask is None and (past == 0 or T == 1):
            # SDPA's fast paths: a plain causal prefix, or one new token that sees every cached one
            attn_mask, is_causal = None, past == 0
        else:
            attn_mask, is_causal = build_attention_mask(T, past, doc_ids, attention_mask, device), False

        x = self.embed_tokens(input_ids)  # (B, T, D)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x.dtype
        cfg = self.config
        rope = self.rope_fn(position_ids, cfg.rotary_dim, cfg.rope_theta, dtype, cfg.rope_scaling_factor)

        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_checkpoint and kv_cache is None:
                x = checkpoint(block, x, rope, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(x)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        doc_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        return_logits: bool = True,
    ) -> GLMOutput:
        """Logits (B, T, V) and, with labels (B, T; -100 = ignore), the mean next-token loss (shift inside).

        ``return_logits=False`` (only with labels) drops the logits from the output once the loss is computed;
        with ``kernels.fused_ce == "triton"`` the loss is then computed without them (``fused_causal_lm_loss``).
        """
        h = self.hidden_states(input_ids, position_ids, doc_ids, attention_mask, kv_cache)
        if labels is not None and not return_logits and self.kernels.fused_ce == "triton":
            return GLMOutput(logits=None, loss=fused_causal_lm_loss(h, self.lm_head, labels))
        logits = self.lm_head(h)  # (B, T, V)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        if loss is not None and not return_logits:
            logits = None
        return GLMOutput(logits=logits, loss=loss)
