"""Arithmetic of a training step, from the configs alone (nothing is allocated): FLOPs per token and MFU,
and the memory of one GPU under ZeRO 0-3 with or without CPU offload, for the pretraining dry run.

FLOPs per trained token (forward + backward, the PaLM paper's appendix B count):
    6 * N  +  12 * L * H * hd * T_ctx
N: the parameters that multiply (every weight matrix, the LM head included, the input embedding not: it is
a lookup); L layers, H query heads of width hd; T_ctx the mean context a token attends to: (T + 1) / 2 for
causal attention over a row of T tokens (the attention term counts QK^T and AV, 2 matmuls x 2 FLOPs x 3 for
forward + backward). Activation checkpointing recomputes the forward but is not counted (MFU counts the
model's FLOPs, not the hardware's).

MFU = FLOPs per token x tokens/s / (peak FLOP/s per device x devices); the peak comes from
``train.peak_tflops`` or, on CUDA, from ``PEAK_TFLOPS`` by device name (dense bf16 tensor-core numbers
from the vendors' data sheets). On a CPU there is no peak in the table, so MFU is not reported.

Memory per GPU (the ZeRO paper's model, Rajbhandari et al. 2020, section 3 and figure 1), mixed precision
with Adam: parameters 2 bytes, gradients 2 bytes, optimizer states K = 12 bytes (fp32 master weights,
momentum, variance) per parameter; ZeRO-1 partitions the optimizer states over the N data-parallel ranks,
ZeRO-2 also the gradients, ZeRO-3 also the parameters; CPU offload moves the optimizer states (and under
ZeRO-3 the parameters) to host memory. Activations per layer with a fused / flash attention (Korthikanti et
al. 2022, table 2, without the 5 a s / h score term that flash attention never stores): 34 * s * b * h
bytes; with activation checkpointing only each layer's input (2 * s * b * h bytes) stays, plus one layer's
full activations while it is recomputed. The logits add s * b * V * 6 bytes (bf16 + fp32 for the loss)
unless the fused cross-entropy kernel is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glmwb.pretrain.config import GLMConfig

# dense (no sparsity) bf16 tensor-core TFLOP/s per device, by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "L4": 121.0,
    "V100": 125.0,  # fp16
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}
GB = 1e9


def matmul_params(cfg: GLMConfig) -> int:
    """Parameters that take part in a matrix multiply: all but the input embedding."""
    return cfg.num_params() - cfg.vocab_size * cfg.hidden_size


def flops_per_token(cfg: GLMConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token: 6 N + 12 L H hd T_ctx (see the module docstring)."""
    context = (seq_len + 1) / 2 if causal else seq_len
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context


def peak_tflops(device_name: str | None, configured: float | None = None) -> float | None:
    """The configured peak, else the table's entry for a CUDA device name, else None (a CPU: no MFU)."""
    if configured is not None:
        return configured
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def mfu(flops_token: float, tokens_per_s: float, peak: float | None, devices: int = 1) -> float | None:
    return None if peak is None else flops_token * tokens_per_s / (peak * 1e12 * devices)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by what holds them; ``cpu_bytes``: what offload puts in each rank's host memory."""

    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    cpu_bytes: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.logits

    def to_dict(self) -> dict[str, Any]:
        d = {
            k: round(getattr(self, k) / GB, 3)
            for k in ("params", "grads", "optimizer", "activations", "logits")
        }
        return {**d, "total": round(self.total / GB, 3), "cpu_offloaded": round(self.cpu_bytes / GB, 3)}


def model_state_bytes(
    num_params: float, zero_stage: int, ranks: int, offload: bool = False, k_optimizer: float = 12.0
) -> tuple[float, float, float, float]:
    """(parameters, gradients, optimizer states, offloaded to CPU) bytes per rank, mixed-precision Adam."""
    params, grads, optim = 2.0 * num_params, 2.0 * num_params, k_optimizer * num_params
    if zero_stage >= 1:
        optim /= ranks
    if zero_stage >= 2:
        grads /= ranks
    if zero_stage >= 3:
        params /= ranks
    cpu = 0.0
    if offload:
        cpu, optim = cpu + optim, 0.0
        if zero_stage == 3:
            cpu, params = cpu + params, 0.0
    return params, grads, optim, cpu


def activation_bytes(
    cfg: GLMConfig, seq_len: int, micro_batch: int, checkpointing: bool, fused_ce: bool
) -> tuple[float, float]:
    """(activations, logits) bytes of one micro-batch's forward kept for the backward, bf16."""
    sbh = seq_len * micro_batch * cfg.hidden_size
    per_layer = 34.0 * sbh
    acts = cfg.num_layers * 2.0 * sbh + per_layer if checkpointing else cfg.num_layers * per_layer
    logits = 0.0 if fused_ce else 6.0 * seq_len * micro_batch * cfg.vocab_size
    return acts, logits


def estimate_memory(
    cfg: GLMConfig,
    seq_len: int,
    micro_batch: int,
    zero_stage: int,
    ranks: int,
    offload: bool = False,
    checkpointing: bool = False,
    fused_ce: bool = False,
) -> MemoryEstimate:
    params, grads, optim, cpu = model_state_bytes(cfg.num_params(), zero_stage, ranks, offload)
    acts, logits = activation_bytes(cfg, seq_len, micro_batch, checkpointing, fused_ce)
    return MemoryEstimate(params, grads, optim, acts, logits, cpu)


def step_seconds(
    cfg: GLMConfig, seq_len: int, global_tokens: int, ranks: int, peak: float, assumed_mfu: float,
    recompute: bool = False,
) -> float:  # fmt: skip
    """The time of one optimizer step at ``assumed_mfu`` of ``peak`` TFLOP/s on each of ``ranks`` devices;
    activation checkpointing adds one more forward (2 N of the 6 N)."""
    hardware_flops = flops_per_token(cfg, seq_len) * (4 / 3 if recompute else 1.0)
    return global_tokens * hardware_flops / (ranks * peak * 1e12 * assumed_mfu)
