"""Model configuration for the GLM-4 architecture (``transformers`` model_type ``glm`` / ``glm4``).

One frozen dataclass; ``pretrain/hf.py`` converts it to and from ``transformers.GlmConfig``.
Defaults are a toy model; ``GLMConfig.glm4_9b()`` gives the real GLM-4-9B layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any

from glmwb.pretrain.ranges import NonNegInt, PositiveFloat, PositiveInt, Range


@dataclass(frozen=True)
class GLMConfig:
    vocab_size: PositiveInt = 4096
    hidden_size: PositiveInt = 256
    intermediate_size: PositiveInt = 688  # SwiGLU width; gate_up_proj is hidden -> 2 * intermediate
    num_layers: PositiveInt = 6
    num_heads: PositiveInt = 8  # query heads
    num_kv_heads: PositiveInt = 2  # grouped-query attention: num_heads % num_kv_heads == 0
    head_dim: PositiveInt = 32
    rms_norm_eps: PositiveFloat = 1.5625e-07
    rope_theta: PositiveFloat = 10_000.0  # GLM: 10,000 x rope_ratio; raise it to extend the context
    # position interpolation (Chen et al. 2023; Hugging Face's "linear" rope): positions divided by this
    rope_scaling_factor: Annotated[float, Range(lo=1)] = 1.0
    # only the first half of each head rotates
    partial_rotary_factor: Annotated[float, Range(0, 1, lo_open=True)] = 0.5
    max_position_embeddings: PositiveInt = 2048
    attention_bias: bool = True  # bias on q, k, v only (never on o_proj or the MLP)
    post_norms: bool = False  # glm4 (GLM-4-0414) "sandwich" norms after attention and MLP
    initializer_range: PositiveFloat = 0.02
    pad_token_id: NonNegInt | None = None
    eos_token_ids: tuple[
        NonNegInt, ...
    ] = ()  # the turn terminators: <|endoftext|>, <|user|>, <|observation|>

    def __post_init__(self) -> None:
        checks = [
            (self.vocab_size > 0, "vocab_size must be > 0"),
            (self.hidden_size > 0, "hidden_size must be > 0"),
            (self.num_layers > 0, "num_layers must be > 0"),
            (self.num_heads > 0 and self.num_kv_heads > 0, "num_heads and num_kv_heads must be > 0"),
            (
                self.num_heads % self.num_kv_heads == 0,
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})",
            ),
            (
                0.0 < self.partial_rotary_factor <= 1.0,
                f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}",
            ),
            (
                self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
                f"head_dim ({self.head_dim}) x partial_rotary_factor ({self.partial_rotary_factor}) "
                f"must be a positive even number, got {self.head_dim * self.partial_rotary_factor}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GLMConfig: {message}")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def rotary_dim(self) -> int:
        """Number of leading dims of each head that rotate (64 of 128 in GLM-4-9B)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GLMConfig:
        return cls(**d)

    def with_(self, **changes: Any) -> GLMConfig:
        return replace(self, **changes)

    @classmethod
    def glm4_9b(cls) -> GLMConfig:
        """THUDM GLM-4-9B: vocab 151,552; hidden 4,096; 40 layers; 32 q heads, 2 KV heads."""
        return cls(
            vocab_size=151_552,
            hidden_size=4096,
            intermediate_size=13_696,
            num_layers=40,
            num_heads=32,
            num_kv_heads=2,
            head_dim=128,
            rms_norm_eps=1.5625e-07,
            rope_theta=10_000.0,
            max_position_embeddings=131_072,
            pad_token_id=151_329,
            eos_token_ids=(151_329, 151_336, 151_338),
        )

    def num_params(self) -> int:
        """Parameter count (embedding and untied lm_head included)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * (q + 2 * kv) + (q + 2 * kv) * self.attention_bias + q * h
        mlp = h * 2 * self.intermediate_size + self.intermediate_size * h
        norms = h * (4 if self.post_norms else 2)
        return 2 * self.vocab_size * h + self.num_layers * (attn + mlp + norms) + h
