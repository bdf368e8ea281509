"""Our GLM <-> Hugging Face ``glm`` / ``glm4``: config, state dict, and model folders, both ways.

Name map (i = layer), ours -> Hugging Face:
    embed_tokens.weight                  -> model.embed_tokens.weight
    blocks.i.attn_norm.weight            -> model.layers.i.input_layernorm.weight
    blocks.i.attn.qkv_proj.{weight,bias} -> model.layers.i.self_attn.{q,k,v}_proj.{weight,bias}  (split)
    blocks.i.attn.o_proj.weight          -> model.layers.i.self_attn.o_proj.weight
    blocks.i.post_attn_norm.weight       -> model.layers.i.post_self_attn_layernorm.weight      (glm4 only)
    blocks.i.mlp_norm.weight             -> model.layers.i.post_attention_layernorm.weight
    blocks.i.mlp.gate_up_proj.weight     -> model.layers.i.mlp.gate_up_proj.weight
    blocks.i.mlp.down_proj.weight        -> model.layers.i.mlp.down_proj.weight
    blocks.i.post_mlp_norm.weight        -> model.layers.i.post_mlp_layernorm.weight            (glm4 only)
    norm.weight                          -> model.norm.weight
    lm_head.weight                       -> lm_head.weight
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import Tensor

from glmwb.kernels.config import KernelConfig
from glmwb.pretrain.config import GLMConfig
from glmwb.pretrain.model import GLM

# ours (with {i}) <-> Hugging Face, for every tensor that maps one to one
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "post_attn_norm.weight": "post_self_attn_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_up_proj.weight": "mlp.gate_up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "post_mlp_norm.weight": "post_mlp_layernorm.weight",
}
_TOP_NAMES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_OURS_LAYER = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# saved by some older Hugging Face checkpoints; recomputed by both models, never loaded
_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------------------------------------
# Config


def to_hf_config(cfg: GLMConfig) -> transformers.GlmConfig | transformers.Glm4Config:
    """``GlmConfig`` (or ``Glm4Config`` when ``post_norms``) with the same architecture."""
    config_cls = transformers.Glm4Config if cfg.post_norms else transformers.GlmConfig
    hf = config_cls(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={
            "rope_type": "default" if cfg.rope_scaling_factor == 1.0 else "linear",
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.partial_rotary_factor,
            **({"factor": cfg.rope_scaling_factor} if cfg.rope_scaling_factor != 1.0 else {}),
        },
        attention_bias=cfg.attention_bias,
        tie_word_embeddings=False,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=list(cfg.eos_token_ids) or None,
        bos_token_id=None,
    )
    hf.eos_token_id = list(cfg.eos_token_ids) or None  # GlmConfig fills GLM-4-9B's ids in for None
    hf.architectures = ["Glm4ForCausalLM" if cfg.post_norms else "GlmForCausalLM"]
    return hf


def from_hf_config(hf_cfg: transformers.PretrainedConfig | Mapping[str, Any]) -> GLMConfig:
    """Our config from a ``GlmConfig`` / ``Glm4Config`` (or its ``config.json`` dict)."""
    d = hf_cfg.to_dict() if isinstance(hf_cfg, transformers.PretrainedConfig) else dict(hf_cfg)
    model_type = d.get("model_type")
    if model_type not in ("glm", "glm4"):
        raise ValueError(f"from_hf_config: expected model_type 'glm' or 'glm4', got {model_type!r}")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise NotImplementedError(
            f"from_hf_config: rope_type {rope_type!r} is not supported (only 'default' and 'linear')"
        )
    if d.get("tie_word_embeddings", False):
        raise NotImplementedError(
            "from_hf_config: tied embeddings are not supported (GLM's lm_head is untied)"
        )
    head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    eos = d.get("eos_token_id")
    eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    return GLMConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=head_dim,
        rms_norm_eps=d["rms_norm_eps"],
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10_000.0))),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))),
        rope_scaling_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
        max_position_embeddings=d["max_position_embeddings"],
        attention_bias=d.get("attention_bias", True),
        post_norms=model_type == "glm4",
        initializer_range=d.get("initializer_range", 0.02),
        pad_token_id=d.get("pad_token_id"),
        eos_token_ids=eos_ids,
    )


# ----------------------------------------------------------------------------------------------------------
# State dict


def _strip_wrappers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the prefixes torch.compile ('_orig_mod.') and DDP ('module.') put in front of names."""
    return {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in sd.items()}


def _check_keys(what: str, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise KeyError(
            f"{what}: missing keys {sorted(missing)[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected keys {sorted(unexpected)[:20]}{' ...' if len(unexpected) > 20 else ''}"
        )


def to_hf_state_dict(sd: Mapping[str, Tensor], cfg: GLMConfig | None = None) -> dict[str, Tensor]:
    """Our state dict -> Hugging Face ``glm`` / ``glm4`` names, the fused qkv split into q / k / v.

    The head layout is read from the shapes (q width = o_proj's input width) unless ``cfg`` is given.
    The q / k / v tensors are views of the fused tensor (no copy).
    """
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    o_proj_in: dict[str, int] = {}
    sd = _strip_wrappers(sd)
    for name, t in sd.items():
        m = _OURS_LAYER.fullmatch(name)
        if m and m.group(2) == "attn.o_proj.weight":
            o_proj_in[m.group(1)] = t.shape[1]
    for name, t in sd.items():
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = t
            continue
        m = _OURS_LAYER.fullmatch(name)
        if m is None:
            unexpected.append(name)
            continue
        i, rest = m.groups()
        prefix = f"model.layers.{i}."
        if rest in _LAYER_NAMES:
            out[prefix + _LAYER_NAMES[rest]] = t
        elif rest in ("attn.qkv_proj.weight", "attn.qkv_proj.bias"):
            if cfg is not None:
                q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            elif i in o_proj_in:
                q_dim = o_proj_in[i]
                kv_dim = (t.shape[0] - q_dim) // 2
            else:
                raise KeyError(
                    f"to_hf_state_dict: cannot split {name} without blocks.{i}.attn.o_proj.weight or cfg"
                )
            kind = rest.rsplit(".", 1)[1]
            q, k, v = t.split((q_dim, kv_dim, kv_dim), dim=0)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v), strict=True):
                out[f"{prefix}self_attn.{proj}.{kind}"] = part
        else:
            unexpected.append(name)
    _check_keys("to_hf_state_dict", [], unexpected)
    return out


def from_hf_state_dict(sd: Mapping[str, Tensor], cfg: GLMConfig) -> dict[str, Tensor]:
    """Hugging Face ``glm`` / ``glm4`` state dict -> ours (q / k / v fused); every key checked both ways."""
    sd = {k: v for k, v in _strip_wrappers(sd).items() if not _HF_IGNORED.fullmatch(k)}
    names = to_hf_names(cfg)
    expected = {n for hf_names in names.values() for n in hf_names}
    _check_keys("from_hf_state_dict", sorted(expected - sd.keys()), sorted(sd.keys() - expected))
    return {
        ours: sd[hf_names[0]] if len(hf_names) == 1 else torch.cat([sd[n] for n in hf_names], dim=0)
        for ours, hf_names in names.items()
    }


def _param_names(cfg: GLMConfig) -> list[str]:
    """Our parameter names for ``cfg`` (without building the model)."""
    names = list(_TOP_NAMES)
    for i in range(cfg.num_layers):
        for rest in _LAYER_NAMES:
            if rest.startswith("post_") and not cfg.post_norms:
                continue
            names.append(f"blocks.{i}.{rest}")
        names.append(f"blocks.{i}.attn.qkv_proj.weight")
        if cfg.attention_bias:
            names.append(f"blocks.{i}.attn.qkv_proj.bias")
    return names


def to_hf_names(cfg: GLMConfig) -> dict[str, list[str]]:
    """Our parameter name -> the Hugging Face names it becomes (three for a fused qkv)."""
    out: dict[str, list[str]] = {}
    for name in _param_names(cfg):
        if name in _TOP_NAMES:
            out[name] = [_TOP_NAMES[name]]
            continue
        i, rest = _OURS_LAYER.fullmatch(name).groups()
        if rest.startswith("attn.qkv_proj."):
            kind = rest.rsplit(".", 1)[1]
            out[name] = [f"model.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv"]
        else:
            out[name] = [f"model.layers.{i}.{_LAYER_NAMES[rest]}"]
    return out


# ----------------------------------------------------------------------------------------------------------
# Folders


def _owning_copy(t: Tensor) -> Tensor:
    """safetensors refuses tensors that share storage (our q / k / v views): copy those, keep the rest."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def save_pretrained(model: GLM, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write a Hugging Face folder: config.json (``GlmConfig`` / ``Glm4Config``), model.safetensors,
    generation_config.json (eos = the config's turn terminators) and the tokenizer when given.

    ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads it as ``GlmForCausalLM``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    hf_cfg = to_hf_config(cfg)
    hf_cfg.dtype = dtype
    hf_cfg.save_pretrained(folder)
    state = {k: _owning_copy(v) for k, v in to_hf_state_dict(model.state_dict(), cfg).items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    transformers.GenerationConfig(
        eos_token_id=list(cfg.eos_token_ids) or None,
        pad_token_id=cfg.pad_token_id,
    ).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _load_hf_weights(folder: Path) -> dict[str, Tensor]:
    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        sd: dict[str, Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(str(folder / shard)))
        return sd
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"load_pretrained: {folder} has no model.safetensors(.index.json) or pytorch_model.bin"
    )


def load_pretrained(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    kernels: KernelConfig | None = None,
) -> GLM:
    """Our GLM from a folder written by ``save_pretrained`` or by ``GlmForCausalLM`` / ``Glm4ForCausalLM``
    (single or sharded safetensors). Tensors are cast to ``dtype``; no random init is materialised.
    ``kernels``: the model's ops (``GLM(config, kernels)``; None: plain PyTorch)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"load_pretrained: no config.json in {folder}")
    cfg = from_hf_config(json.loads(config_path.read_text()))
    sd = from_hf_state_dict(_load_hf_weights(folder), cfg)
    sd = {k: v.to(device=device or "cpu", dtype=dtype) for k, v in sd.items()}
    with torch.device("meta"):
        model = GLM(cfg, kernels)
    model.load_state_dict(sd, assign=True)
    return model
