"""``apply_kernels(model)``: swap our kernels into ``transformers``' Glm / Glm4 models, reversibly.

Those classes' code is not ours, so the kernels go in from outside: per instance, the module's ``forward`` is
set on that instance (classes and the ``transformers`` module namespace are never touched). Our own GLM
(``pretrain.model.GLM``) needs none of this: it picks its ops when it is built (``GLM(config, kernels=...)``).

| choice      | what is replaced in ``transformers``' Glm / Glm4 (CausalLM, Model, ...)                    |
|-------------|--------------------------------------------------------------------------------------------|
| rmsnorm     | every ``GlmRMSNorm`` / ``Glm4RMSNorm`` -> ``kernels.rmsnorm``                              |
| swiglu      | ``GlmMLP`` / ``Glm4MLP``: down(swiglu(gate_up(x))) (hidden_act must be silu)               |
| rotary      | ``GlmAttention`` / ``Glm4Attention``: Triton rotary, positions from the layer's position_ids |
| attention   | the same attention forward -> ``kernels.attention`` (sdpa / eager attn_implementation)     |
| fused_ce    | ``*ForCausalLM.forward`` with labels in training mode: fused linear + CE, logits None      |

Choices come from a config section such as ``kernels: {rmsnorm: triton, swiglu: torch}`` (a frozen
``KernelConfig``, kernels/config.py; "torch" keeps the model's own code) and/or keyword flags (``True`` = our
kernel, ``False`` = torch). The returned ``KernelHandle.remove()`` (or ``revert_kernels(model)``) restores
every replaced ``forward`` exactly as it was; parameters and buffers are never replaced, so the state dict and
the optimizer's parameters are the same objects throughout. Applying to a model that already has kernels
applied is an ERROR (``RuntimeError``): remove the first handle to change the choice.

On a CPU the Triton kernels run only under ``TRITON_INTERPRET=1``; ``apply_kernels`` says so up front.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmwb.kernels.config import KernelConfig, check_triton_can_run, kernel_choice

_HANDLE_ATTR = "_kernel_handle"


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
    """Swap kernels into ``model`` (``transformers``' Glm / Glm4 models); returns the handle.

    ``config``: a ``KernelConfig`` or its dict (the recipe's ``kernels:`` section); default all kernels on.
    Keyword flags override it: True = our kernel, False = the model's torch code, or a choice string.
    """
    base = config if isinstance(config, KernelConfig) else KernelConfig.from_dict(config)
    flags = {
        "rmsnorm": rmsnorm,
        "swiglu": swiglu,
        "rotary": rotary,
        "fused_ce": fused_ce,
        "attention": attention,
    }
    cfg = replace(base, **{name: kernel_choice(name, v) for name, v in flags.items() if v is not None})

    existing = model.__dict__.get(_HANDLE_ATTR)
    if existing is not None and existing.active:
        raise RuntimeError(
            f"apply_kernels: kernels are already applied to this {type(model).__name__} ({existing.config}); "
            "call handle.remove() (or revert_kernels(model)) first"
        )
    if not _hf_glm_modules(model):
        raise ValueError(
            f"apply_kernels: unsupported model {type(model).__name__}; supported: transformers' Glm / Glm4 "
            "models (GlmForCausalLM, Glm4ForCausalLM, GlmModel, ...). Our GLM picks its kernels when it is "
            "built: GLM(config, kernels=KernelConfig(...))"
        )
    if cfg.uses_triton():
        check_triton_can_run("apply_kernels")

    handle = KernelHandle(model, cfg)
    try:
        _apply_to_hf_glm(model, cfg, handle)
    except BaseException:
        handle.remove()
        raise
    model.__dict__[_HANDLE_ATTR] = handle
    return handle


# ----------------------------------------------------------------------------------------------------------
# Forwards of the norm and the MLP


def _rmsnorm_forward(self, x: torch.Tensor, original: Callable) -> torch.Tensor:
    from glmwb.kernels.rmsnorm import rmsnorm

    return rmsnorm(x, self.weight, self.variance_epsilon)


def _swiglu_mlp_forward(self, x: torch.Tensor, original: Callable) -> torch.Tensor:
    from glmwb.kernels.swiglu import swiglu

    return self.down_proj(swiglu(self.gate_up_proj(x)))  # gate_up (.., 2I), gate first


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
        for module in modules:
            if isinstance(module, classes["norm"]):
                handle.patch(module, "forward", _rmsnorm_forward, "rmsnorm")
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
