"""The state-dict adapter and Hugging Face folders, both ways."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from glmwb.pretrain.config import GLMConfig
from glmwb.pretrain.hf import (
    from_hf_config,
    from_hf_state_dict,
    load_pretrained,
    save_pretrained,
    to_hf_config,
    to_hf_state_dict,
)
from tests.test_model import hf_twin, random_glm, small_config


@pytest.mark.parametrize("post_norms", [False, True])
def test_config_round_trip(post_norms):
    cfg = small_config(
        post_norms=post_norms,
        rope_theta=5e6,
        partial_rotary_factor=0.25,
        pad_token_id=3,
        eos_token_ids=(3, 7, 9),
    )
    hf_cfg = to_hf_config(cfg)
    assert type(hf_cfg) is (transformers.Glm4Config if post_norms else transformers.GlmConfig)
    assert hf_cfg.rope_parameters == {
        "rope_type": "default",
        "rope_theta": 5e6,
        "partial_rotary_factor": 0.25,
    }
    assert (hf_cfg.num_hidden_layers, hf_cfg.num_key_value_heads, hf_cfg.head_dim) == (2, 2, 16)
    assert hf_cfg.eos_token_id == [3, 7, 9] and hf_cfg.pad_token_id == 3 and not hf_cfg.tie_word_embeddings
    assert from_hf_config(hf_cfg) == cfg
    assert from_hf_config(json.loads(hf_cfg.to_json_string())) == cfg  # from a config.json dict too


def test_config_without_eos_or_pad_stays_empty():
    hf_cfg = to_hf_config(small_config())
    assert hf_cfg.eos_token_id is None and hf_cfg.pad_token_id is None  # not GLM-4-9B's defaults
    assert from_hf_config(hf_cfg).eos_token_ids == ()


def test_glm4_9b_config_matches_transformers_defaults():
    ours = from_hf_config(transformers.GlmConfig())  # transformers' defaults are THUDM/glm-4-9b-chat
    assert ours == GLMConfig.glm4_9b()


def test_from_hf_config_rejects_what_we_cannot_run():
    d = to_hf_config(small_config()).to_dict()
    with pytest.raises(ValueError, match="model_type"):
        from_hf_config({**d, "model_type": "llama"})
    with pytest.raises(NotImplementedError, match="yarn"):
        from_hf_config({**d, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})


@pytest.mark.parametrize("post_norms", [False, True])
def test_state_dict_round_trip_is_exact_and_uses_transformers_names(post_norms):
    cfg = small_config(post_norms=post_norms)
    model = random_glm(cfg)
    ours = model.state_dict()
    hf_sd = to_hf_state_dict(ours)
    hf_cls = transformers.Glm4ForCausalLM if post_norms else transformers.GlmForCausalLM
    assert set(hf_sd) == set(hf_cls(to_hf_config(cfg)).state_dict())
    assert (
        "model.layers.1.self_attn.q_proj.bias" in hf_sd and "model.layers.0.mlp.gate_up_proj.weight" in hf_sd
    )
    assert hf_sd["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    back = from_hf_state_dict(hf_sd, cfg)
    assert set(back) == set(ours)
    for name, t in ours.items():
        assert torch.equal(back[name], t), name
    # the config-free split and the config-driven one agree
    assert all(torch.equal(hf_sd[k], v) for k, v in to_hf_state_dict(ours, cfg).items())


def test_state_dict_without_attention_bias():
    cfg = small_config(attention_bias=False)
    sd = random_glm(cfg).state_dict()
    hf_sd = to_hf_state_dict(sd)
    assert not any(k.endswith("bias") for k in hf_sd)
    back = from_hf_state_dict(hf_sd, cfg)
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_wrapper_prefixes_are_stripped():
    sd = random_glm(small_config()).state_dict()
    compiled_names = {f"_orig_mod.{k}": v for k, v in sd.items()}
    assert set(to_hf_state_dict(compiled_names)) == set(to_hf_state_dict(sd))


def test_missing_and_unexpected_keys_are_named():
    cfg = small_config()
    hf_sd = to_hf_state_dict(random_glm(cfg).state_dict())
    del hf_sd["model.layers.1.self_attn.v_proj.weight"]
    hf_sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as err:
        from_hf_state_dict(hf_sd, cfg)
    assert "model.layers.1.self_attn.v_proj.weight" in str(err.value)
    assert "model.layers.0.mlp.up_proj.weight" in str(err.value)
    with pytest.raises(KeyError, match="blocks.0.attn.extra"):
        to_hf_state_dict({"blocks.0.attn.extra": torch.zeros(1)})
    # old checkpoints that saved the rotary buffer still load
    hf_ok = to_hf_state_dict(random_glm(cfg).state_dict())
    hf_ok["model.rotary_emb.inv_freq"] = torch.zeros(4)
    from_hf_state_dict(hf_ok, cfg)


def _tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<unk>": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.mark.parametrize("post_norms", [False, True])
def test_save_pretrained_loads_in_transformers_with_the_same_logits(tmp_path, post_norms):
    cfg = small_config(post_norms=post_norms, pad_token_id=0, eos_token_ids=(0, 5))
    model = random_glm(cfg)
    save_pretrained(model, tmp_path, tokenizer=_tiny_tokenizer())
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / name).exists(), name
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, 5] and generation["pad_token_id"] == 0

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert type(hf).__name__ == ("Glm4ForCausalLM" if post_norms else "GlmForCausalLM")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).encode("hello world") == [2, 3]
    input_ids = torch.randint(0, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(input_ids).logits - hf(input_ids).logits).abs().max() <= 1e-4

    again = load_pretrained(tmp_path)
    assert again.config == cfg
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("sharded", [False, True])
def test_transformers_saved_folder_loads_into_ours(tmp_path, sharded):
    cfg = small_config(num_kv_heads=1)
    hf = hf_twin(random_glm(cfg, seed=3))
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    model = load_pretrained(tmp_path)
    input_ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(input_ids).logits - hf(input_ids).logits).abs().max() <= 1e-4
    half = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_load_pretrained_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
