"""``apply_kernels(model)``: swap our kernels into a GLM, reversibly, chosen by a config.

Supported models and what each choice replaces (per instance: the module's ``forward`` is set on that
instance; classes and the ``transformers`` module namespace are never touched):

| choice      | ``pretrain.model.GLM``                         | ``transformers`` Glm / Glm4 (CausalLM, Model, ...) |
|-------------|------------------------------------------------|-----------------------------------------------------|
| rmsnorm     | every ``RMSNorm`` -> ``kernels.rmsnorm``;      | every ``GlmRMSNorm`` / ``Glm4RMSNorm``              |
|             | ``Block``: residual add + MLP norm fused       |                                                     |
| swiglu      | ``MLP``: down(swiglu(gate_up(x)))              | ``GlmMLP`` / ``Glm4MLP`` (hidden_act must be silu)  |
| rotary      | ``Attention``: Triton rotary on q and k        | ``GlmAttention`` / ``Glm4Attention``: Triton rotary |
| attention   | ``Attention``: ``kernels.attention`` dispatch  | same, for the sdpa / eager attn_implementation      |
| fused_ce    | ``GLM.forward`` with labels and                | ``*ForCausalLM.forward`` with labels in training    |
|             | ``return_logits=False``: fused linear + CE     | mode: fused linear + CE, logits None (as Liger)     |

Choices come from a config section such as ``kernels: {rmsnorm: triton, swiglu: torch}`` (a frozen
``KernelConfig``; "torch" keeps the model's own code) and/or keyword flags (``True`` = our kernel,
``False`` = torch). The returned ``KernelHandle.remove()`` (or ``revert_kernels(model)``) restores every
replaced ``forward`` exactly as it was; parameters and buffers are never replaced, so the state dict and
the optimizer's parameters are the same objects throughout. Applying to a model that already has kernels
applied is an ERROR (``RuntimeError``): remove the first handle to change the choice.

Rotary in our GLM: the model hands each block cos / sin only, while the Triton kernel computes the angles
from the positions (fp32, never rounded to bf16). So ``GLM.hidden_states`` is wrapped to work out the
positions by the model's own rule (given, else restarting per document, else from the padding mask, else
0..T-1 after the cache) and to pass them explicitly; the first attention layer to see that call's cos
tensor tags it with the positions, which later layers and gradient-checkpoint recomputation (same tensor)
read back. An attention call whose cos carries no positions falls back to the model's own rotary.

On a CPU the Triton kernels run only under ``TRITON_INTERPRET=1``; ``apply_kernels`` says so up front.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_CHOICES: dict[str, tuple[str, ...]] = {
    "rmsnorm": ("triton", "torch"),
    "swiglu": ("triton", "torch"),
    "rotary": ("triton", "torch"),
    "fused_ce": ("triton", "torch"),
    "attention": ("auto", "sdpa", "flash_attn", "torch"),  # auto: flash-attn where it can run, else SDPA
}
_HANDLE_ATTR = "_kernel_handle"


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class KernelConfig:
    """Which implementation each op uses; "torch" keeps the model's own code."""

    rmsnorm: str = "triton"
    swiglu: str = "triton"
    rotary: str = "triton"
    fused_ce: str = "triton"
    attention: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in KERNEL_CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"KernelConfig: {name} must be one of {allowed}, got {value!r}")

    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | None) -> KernelConfig:
        """Strict: unknown keys are an error naming the allowed ones; booleans mean our kernel / torch."""
        section = dict(section or {})
        unknown = sorted(set(section) - set(KERNEL_CHOICES))
        if unknown:
            raise ValueError(f"KernelConfig: unknown key(s) {unknown}; allowed: {sorted(KERNEL_CHOICES)}")
        return cls(**{name: _choice(name, value) for name, value in section.items()})

    @classmethod
    def all_torch(cls) -> KernelConfig:
        return cls(**{name: "torch" for name in KERNEL_CHOICES})

    def uses_triton(self) -> bool:
        return "triton" in (self.rmsnorm, self.swiglu, self.rotary, self.fused_ce)


def _choice(name: str, value: Any) -> str:
    if value is True:
        return KERNEL_CHOICES[name][0]
    if value is False:
        return "torch"
    return value


# ----------------------------------------------------------------------------------------------------------
# Handle: the record of every replaced forward


class KernelHandle:
    """What ``apply_kernels`` changed; ``remove()`` puts it all back (idempotent)."""

    def __init__(self, model: nn.Module, config: KernelConfig) -> None:
        self.model, self.config = model, config
        self._patches: list[tuple[object, str, bool, object]] = []  # (obj, attr, had own attr, old value)
        self.replaced: dict[str, int] = {}  # what was swapped: e.g. {"rmsnorm": 5, "swiglu": 2}

    def patch(self, obj: object, attr: str, fn: Callable, kind: str) -> None:
        """Set ``obj.<attr>`` (an instance attribute) to ``fn`` bound to obj, remembering what was there.

        ``fn(self, *args, original=..., **kwargs)``: ``original`` is what ``obj.<attr>`` was before (the
        class's method, or a wrapper someone else set on the instance, e.g. accelerate's hooks)."""
        own = obj.__dict__
        original = getattr(obj, attr)
        self._patches.append((obj, attr, attr in own, own.get(attr)))
        own[attr] = types.MethodType(functools.partial(fn, original=original), obj)
        self.replaced[kind] = self.replaced.get(kind, 0) + 1

    def remove(self) -> None:
        for obj, attr, had_own, old in reversed(self._patches):
            if had_own:
                obj.__dict__[attr] = old
            else:
                obj.__dict__.pop(attr, None)
        self._patches.clear()
        if self.model.__dict__.get(_HANDLE_ATTR) is self:
            del self.model.__dict__[_HANDLE_ATTR]

    @property
    def active(self) -> bool:
        return bool(self._patches)

    def __repr__(self) -> str:
        return f"KernelHandle({type(self.model).__name__}, {self.config}, replaced={self.replaced})"


def revert_kernels(model: nn.Module) -> None:
    """Undo ``apply_kernels(model)``; an error if no kernels are applied."""
    handle = model.__dict__.get(_HANDLE_ATTR)
    if handle is None:
        raise RuntimeError(f"revert_kernels: no kernels are applied to this {type(model).__name__}")
    handle.remove()


# ----------------------------------------------------------------------------------------------------------
# Entry point


def apply_kernels(
    model: nn.Module,
    config: KernelConfig | Mapping[str, Any] | None = None,
    *,
    rmsnorm: bool | str | None = None,
    swiglu: bool | str | None = None,
    rotary: bool | str | None = None,
    fused_ce: bool | str | None = None,
    attention: bool | str | None = None,
) -> KernelHandle:
    """Swap kernels into ``model`` (our ``GLM``, or ``transformers``' Glm / Glm4 models); returns the handle.

    ``config``: a ``KernelConfig`` or its dict (the recipe's ``kernels:`` section); default all kernels on.
    Keyword flags override it: True = our kernel, False = the model's torch code, or a choice string.
    """
    if isinstance(config, KernelConfig):
        base = config
    else:
        base = KernelConfig.from_dict(config)
    overrides = {
        "rmsnorm": rmsnorm,
        "swiglu": swiglu,
        "rotary": rotary,
        "fused_ce": fused_ce,
        "attention": attention,
    }
    cfg = KernelConfig(
        **{f.name: _choice(f.name, overrides[f.name]) if overrides[f.name] is not None else getattr(base, f.name)
           for f in fields(KernelConfig)}
    )  # fmt: skip

    existing = model.__dict__.get(_HANDLE_ATTR)
    if existing is not None and existing.active:
        raise RuntimeError(
            f"apply_kernels: kernels are already applied to this {type(model).__name__} ({existing.config}); "
            "call handle.remove() (or revert_kernels(model)) first"
        )
    if cfg.uses_triton():
        _check_triton_can_run()

    handle = KernelHandle(model, cfg)
    try:
        if _is_our_glm(model):
            _apply_to_our_glm(model, cfg, handle)
        elif _hf_glm_modules(model):
            _apply_to_hf_glm(model, cfg, handle)
        else:
            raise ValueError(
                f"apply_kernels: unsupported model {type(model).__name__}; supported: pretrain.model.GLM and "
                "transformers' Glm / Glm4 models (GlmForCausalLM, Glm4ForCausalLM, GlmModel, ...)"
            )
    except BaseException:
        handle.remove()
        raise
    model.__dict__[_HANDLE_ATTR] = handle
    return handle


def _check_triton_can_run() -> None:
    from glmwb.kernels._common import is_interpreted
    from glmwb.kernels.rmsnorm import _rmsnorm_fwd_kernel

    if not torch.cuda.is_available() and not is_interpreted(_rmsnorm_fwd_kernel):
        raise ValueError(
            "apply_kernels: the Triton kernels need a CUDA GPU; on a CPU set TRITON_INTERPRET=1 before triton "
            "is first imported, or choose 'torch' for rmsnorm / swiglu / rotary / fused_ce"
        )


# ----------------------------------------------------------------------------------------------------------
# Shared forwards


def _rmsnorm_forward(eps_attr: str) -> Callable:
    from glmwb.kernels.rmsnorm import rmsnorm

    def forward(self, x: torch.Tensor, original: Callable) -> torch.Tensor:
        return rmsnorm(x, self.weight, getattr(self, eps_attr))

    return forward


def _swiglu_mlp_forward(self, x: torch.Tensor, original: Callable) -> torch.Tensor:
    from glmwb.kernels.swiglu import swiglu

    return self.down_proj(swiglu(self.gate_up_proj(x)))  # gate_up (.., 2I), gate first


# ----------------------------------------------------------------------------------------------------------
# Our GLM


def _is_our_glm(model: nn.Module) -> bool:
    mod = sys.modules.get("glmwb.pretrain.model")
    return mod is not None and isinstance(model, mod.GLM)


class _PositionsByCos:
    """The positions of the current ``hidden_states`` call, handed to the attention layers through its cos."""

    TAG = "_kernel_positions"

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None

    def positions_for(self, cos: torch.Tensor) -> torch.Tensor | None:
        positions = getattr(cos, self.TAG, None)
        if positions is None and self.pending is not None and self.pending.shape[-1] == cos.shape[1]:
            positions = self.pending
            setattr(cos, self.TAG, positions)
        return positions


def _our_block_forward(self, x, cos, sin, attn_mask, is_causal, kv_cache=None, *, original):
    """``Block.forward`` with the attention's residual add and the MLP's norm in one kernel
    (``rmsnorm_add``: one pass over the rows instead of an add, then a norm that reads the sum again)."""
    from glmwb.kernels.rmsnorm import rmsnorm_add

    h = self.attn(self.attn_norm(x), cos, sin, attn_mask, is_causal, kv_cache)
    if self.post_attn_norm is not None:
        h = self.post_attn_norm(h)
    normed, x = rmsnorm_add(h, x, self.mlp_norm.weight, self.mlp_norm.eps)  # mlp_norm(x + h), x + h
    h = self.mlp(normed)
    if self.post_mlp_norm is not None:
        h = self.post_mlp_norm(h)
    return x + h


def _apply_to_our_glm(model: nn.Module, cfg: KernelConfig, handle: KernelHandle) -> None:
    from glmwb.pretrain import model as glm

    if cfg.rmsnorm == "triton":
        forward = _rmsnorm_forward("eps")
        for module in model.modules():
            if isinstance(module, glm.RMSNorm):
                handle.patch(module, "forward", forward, "rmsnorm")
            elif isinstance(module, glm.Block):
                handle.patch(module, "forward", _our_block_forward, "add+rmsnorm")
    if cfg.swiglu == "triton":
        for module in model.modules():
            if isinstance(module, glm.MLP):
                handle.patch(module, "forward", _swiglu_mlp_forward, "swiglu")
    if cfg.rotary == "triton" or cfg.attention != "torch":
        from glmwb.kernels.rotary import rotary_inv_freq

        positions = _PositionsByCos()
        inv_freq = rotary_inv_freq(model.config.rotary_dim, model.config.rope_theta)
        attention_forward = _our_attention_forward(cfg, positions, inv_freq)
        kind = (
            "attention"
            if cfg.rotary == "torch"
            else "rotary"
            if cfg.attention == "torch"
            else "rotary+attention"
        )
        for module in model.modules():
            if isinstance(module, glm.Attention):
                handle.patch(module, "forward", attention_forward, kind)
        if cfg.rotary == "triton":
            handle.patch(model, "hidden_states", _our_hidden_states(positions), "positions")
    if cfg.fused_ce == "triton":
        handle.patch(model, "forward", _our_glm_forward, "fused_ce")


def _our_default_positions(
    input_ids: torch.Tensor,
    doc_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    kv_cache: Any,
) -> torch.Tensor:
    """``GLM.hidden_states``' rule for positions when none are given (kept in step by the parity tests)."""
    from glmwb.pretrain.model import doc_position_ids

    batch, seq_len = input_ids.shape
    past = 0 if kv_cache is None else kv_cache.length
    if doc_ids is not None:
        return doc_position_ids(doc_ids)  # (B, T)
    if attention_mask is not None and attention_mask.shape == (batch, past + seq_len):
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
    return torch.arange(past, past + seq_len, device=input_ids.device)[None]  # (1, T)


def _our_hidden_states(positions: _PositionsByCos) -> Callable:
    def hidden_states(
        self, input_ids, position_ids=None, doc_ids=None, attention_mask=None, kv_cache=None, *, original
    ):
        if position_ids is None:
            position_ids = _our_default_positions(input_ids, doc_ids, attention_mask, kv_cache)
        previous, positions.pending = positions.pending, position_ids
        try:
            return original(input_ids, position_ids, doc_ids, attention_mask, kv_cache)
        finally:
            positions.pending = previous

    return hidden_states


def _our_attention_forward(cfg: KernelConfig, positions: _PositionsByCos, inv_freq: torch.Tensor) -> Callable:
    from glmwb.kernels.attention import attention
    from glmwb.kernels.rotary import apply_rotary_qkv_
    from glmwb.pretrain.model import apply_rotary as torch_rotary

    backend = "sdpa" if cfg.attention == "torch" else cfg.attention
    freqs: dict[torch.device, torch.Tensor] = {}

    def forward(self, x, cos, sin, attn_mask, is_causal, kv_cache=None, *, original):
        B, T, C = x.shape
        H, K, hd = self.num_heads, self.num_kv_heads, self.head_dim
        pos = positions.positions_for(cos) if cfg.rotary == "triton" else None
        if pos is not None:
            if x.device not in freqs:
                freqs[x.device] = inv_freq.to(x.device)
            # A Linear on 2-D input returns a fresh tensor (on 3-D input, a view): rotate its q and k heads in
            # place, touching only their rotary half, then view and split (q, k, v: views of one buffer).
            qkv = self.qkv_proj(x.reshape(B * T, C))  # (B * T, (H + 2K) * hd)
            if qkv._base is not None:  # a wrapper returned a view: rotating it in place would copy more
                qkv = qkv.clone(memory_format=torch.contiguous_format)
            qkv = apply_rotary_qkv_(qkv, pos, freqs[x.device], H, K).view(B, T, H + 2 * K, hd)
            q, k, v = qkv.split((H, K, K), dim=2)  # (B, T, H | K | K, hd) views
        else:
            qkv = self.qkv_proj(x).view(B, T, H + 2 * K, hd)  # (B, T, H + 2K, hd)
            qk, v = qkv.split((H + K, K), dim=2)  # (B, T, H + K, hd), (B, T, K, hd)
            q, k = torch_rotary(qk, cos, sin).split((H, K), dim=2)
        if kv_cache is not None:
            k_all, v_all = kv_cache.update(
                self.layer_idx, k.transpose(1, 2), v.transpose(1, 2)
            )  # (B, K, S, hd)
            k, v = k_all.transpose(1, 2), v_all.transpose(1, 2)  # (B, S, K, hd) views
        y = attention(q, k, v, causal=is_causal, attn_mask=attn_mask, backend=backend)  # (B, T, H, hd)
        return self.o_proj(y.reshape(B, T, H * hd))

    return forward


def _our_glm_forward(
    self,
    input_ids,
    position_ids=None,
    doc_ids=None,
    attention_mask=None,
    labels=None,
    kv_cache=None,
    *,
    return_logits: bool = True,
    original: Callable,
):
    """``GLM.forward``; with labels and ``return_logits=False``, the loss by fused linear + CE (no logits)."""
    if labels is None or return_logits:
        return original(
            input_ids, position_ids, doc_ids, attention_mask, labels, kv_cache, return_logits=return_logits
        )
    from glmwb.kernels.fused_linear_ce import fused_linear_cross_entropy
    from glmwb.pretrain.model import IGNORE_INDEX, GLMOutput

    h = self.hidden_states(input_ids, position_ids, doc_ids, attention_mask, kv_cache)  # (B, T, D)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): next-token labels, as causal_lm_loss
    loss = fused_linear_cross_entropy(
        h, self.lm_head.weight, targets, self.lm_head.bias, ignore_index=IGNORE_INDEX
    )
    return GLMOutput(logits=None, loss=loss)


# ----------------------------------------------------------------------------------------------------------
# transformers' Glm / Glm4


def _hf_classes() -> dict[str, tuple[type, ...]]:
    from transformers.models.glm import modeling_glm
    from transformers.models.glm4 import modeling_glm4

    return {
        "norm": (modeling_glm.GlmRMSNorm, modeling_glm4.Glm4RMSNorm),
        "mlp": (modeling_glm.GlmMLP, modeling_glm4.Glm4MLP),
        "attention": (modeling_glm.GlmAttention, modeling_glm4.Glm4Attention),
        "rotary_emb": (modeling_glm.GlmRotaryEmbedding, modeling_glm4.Glm4RotaryEmbedding),
        "causal_lm": (modeling_glm.GlmForCausalLM, modeling_glm4.Glm4ForCausalLM),
    }


def _hf_glm_modules(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False
    classes = _hf_classes()
    return any(isinstance(m, classes["attention"]) for m in model.modules())


def _apply_to_hf_glm(model: nn.Module, cfg: KernelConfig, handle: KernelHandle) -> None:
    classes = _hf_classes()
    modules = list(model.modules())
    if cfg.rmsnorm == "triton":
        forward = _rmsnorm_forward("variance_epsilon")
        for module in modules:
            if isinstance(module, classes["norm"]):
                handle.patch(module, "forward", forward, "rmsnorm")
    if cfg.swiglu == "triton":
        for module in modules:
            if isinstance(module, classes["mlp"]):
                if getattr(module.config, "hidden_act", "silu") not in ("silu", "swish"):
                    raise ValueError(
                        f"apply_kernels: swiglu needs hidden_act='silu', got {module.config.hidden_act!r}; "
                        "choose swiglu: torch"
                    )
                handle.patch(module, "forward", _swiglu_mlp_forward, "swiglu")
    if cfg.rotary == "triton" or cfg.attention != "torch":
        rotary_embs = [m for m in modules if isinstance(m, classes["rotary_emb"])]
        rotary_emb = rotary_embs[0] if len(rotary_embs) == 1 else None
        forward = _hf_attention_forward(cfg, rotary_emb)
        kind = (
            "attention"
            if cfg.rotary == "torch"
            else "rotary"
            if cfg.attention == "torch"
            else "rotary+attention"
        )
        for module in modules:
            if isinstance(module, classes["attention"]):
                handle.patch(module, "forward", forward, kind)
    if cfg.fused_ce == "triton":
        for module in modules:
            if isinstance(module, classes["causal_lm"]):
                handle.patch(module, "forward", _hf_causal_lm_forward, "fused_ce")


def _hf_attention_forward(cfg: KernelConfig, rotary_emb: nn.Module | None) -> Callable:
    """A Glm(4)Attention.forward with the Triton rotary (positions from the decoder layer's ``position_ids``)
    and / or our attention dispatch; anything it cannot do exactly goes to the original forward."""
    from glmwb.kernels.attention import attention
    from glmwb.kernels.rotary import apply_rotary

    backend = "sdpa" if cfg.attention == "torch" else cfg.attention

    def forward(
        self,
        hidden_states,
        position_embeddings=None,
        attention_mask=None,
        past_key_values=None,
        *,
        original,
        **kwargs,
    ):
        # transformers >= 5.24 passes the KV cache as ``cache`` (``past_key_values`` before): take either,
        # and hand it on positionally, which both versions' original forward accept
        cache = past_key_values if past_key_values is not None else kwargs.pop("cache", None)
        position_ids = kwargs.get("position_ids")
        use_rotary = (
            cfg.rotary == "triton"
            and position_ids is not None
            and rotary_emb is not None
            and getattr(rotary_emb, "attention_scaling", 1.0) == 1.0
        )
        impl = self.config._attn_implementation
        use_dispatch = (
            cfg.attention != "torch"
            and impl in ("sdpa", "eager")
            and not kwargs.get("output_attentions", False)
            and (attention_mask is None or (torch.is_tensor(attention_mask) and attention_mask.dim() == 4))
        )
        if not use_rotary and not use_dispatch:
            return original(hidden_states, position_embeddings, attention_mask, cache, **kwargs)

        hf = sys.modules[type(self).__module__]  # modeling_glm or modeling_glm4
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)  # (B, T, Hq, hd)
        k = self.k_proj(hidden_states).view(hidden_shape)  # (B, T, Hkv, hd)
        v = self.v_proj(hidden_states).view(hidden_shape)  # (B, T, Hkv, hd)
        if use_rotary:
            inv_freq = rotary_emb.inv_freq.to(q.device)  # read per call: dynamic rope may update it
            q, k = apply_rotary(q, k, position_ids.to(q.device), inv_freq)
        else:
            cos, sin = position_embeddings
            q, k = hf.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        if cache is not None:
            k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k_all.transpose(1, 2), v_all.transpose(1, 2)  # (B, S, Hkv, hd) views
        dropout = self.attention_dropout if self.training else 0.0
        if use_dispatch:
            out = attention(
                q, k, v, causal=attention_mask is None, attn_mask=attention_mask, scale=self.scaling,
                dropout_p=dropout, backend=backend,
            )  # fmt: skip
        else:
            interface = hf.ALL_ATTENTION_FUNCTIONS.get_interface(impl, hf.eager_attention_forward)
            out, _ = interface(
                self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                dropout=dropout, scaling=self.scaling, **kwargs,
            )  # fmt: skip
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None

    return forward


def _hf_causal_lm_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    *,
    original: Callable,
    **kwargs,
):
    """``Glm(4)ForCausalLM.forward``; in training mode with labels, the loss by fused linear + CE and no
    logits (Liger-Kernel's convention), with transformers' shift, ignore_index and num_items_in_batch."""
    if past_key_values is not None:  # the old name; transformers >= 5.24 calls it ``cache`` (then in kwargs)
        kwargs["past_key_values"] = past_key_values
    if labels is None or not self.training:
        return original(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep,
            **kwargs,
        )  # fmt: skip
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from glmwb.kernels.fused_linear_ce import fused_linear_cross_entropy

    return_dict = kwargs.pop("return_dict", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = self.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
    )  # fmt: skip
    hidden = outputs.last_hidden_state  # (B, T, D)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, T), as ForCausalLMLoss
    shift_labels = shift_labels.to(hidden.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = fused_linear_cross_entropy(
        hidden,
        self.lm_head.weight,
        shift_labels,
        self.lm_head.bias,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    cache_field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    result = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        **{cache_field: getattr(outputs, cache_field)},
    )
    return result.to_tuple() if return_dict is False else result
