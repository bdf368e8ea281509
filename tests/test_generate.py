"""generate(): greedy parity with transformers, per-row stops, sampling controls, reproducibility."""

from __future__ import annotations

import pytest
import torch

from glmwb.pretrain.generate import generate, sample_next
from tests.test_model import hf_twin, random_glm, small_config

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [33, 1, 2, 3, 4, 99, 100, 7, 7, 12, 13]]


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,post_norms", [(4, 4, 16, False), (8, 2, 64, False), (4, 1, 16, True)]
)
def test_greedy_matches_transformers_generate(num_heads, num_kv_heads, head_dim, post_norms):
    cfg = small_config(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        post_norms=post_norms,
        pad_token_id=0,
    )
    model = random_glm(cfg)
    hf = hf_twin(model)
    ours = generate(model, PROMPTS, max_new_tokens=32, temperature=0, stop_token_ids=())
    assert [len(r) for r in ours] == [32, 32, 32]
    for prompt, row in zip(PROMPTS, ours, strict=True):  # one prompt at a time on the HF side
        theirs = hf.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert row == theirs[0, len(prompt) :].tolist()
    # and HF's own left-padded batch
    T = max(map(len, PROMPTS))
    input_ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
    mask = (input_ids != 0).long()
    batch = hf.generate(
        input_ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert ours == batch[:, T:].tolist()


def test_each_row_stops_at_its_first_stop_token():
    model = random_glm(small_config(pad_token_id=0))
    free = generate(model, PROMPTS, max_new_tokens=20, temperature=0, stop_token_ids=())
    # a stop set hit at a different step in each row (and never in the last row)
    stops = {free[0][4], free[1][9]} - set(free[2])
    assert stops, "pick other prompts: no token separates the rows"
    stopped = generate(model, PROMPTS, max_new_tokens=20, temperature=0, stop_token_ids=tuple(stops))
    for row_free, row in zip(free, stopped, strict=True):
        hits = [i for i, t in enumerate(row_free) if t in stops]
        expected = row_free[: hits[0] + 1] if hits else row_free
        assert row == expected
    assert len(stopped[2]) == 20  # the row that never stops runs to max_new_tokens
    assert stopped[0][-1] in stops and stopped[1][-1] in stops


def test_default_stop_tokens_come_from_the_config():
    cfg = small_config(pad_token_id=0)
    free = generate(random_glm(cfg), [PROMPTS[0]], max_new_tokens=10, temperature=0, stop_token_ids=())[0]
    stop = free[3]
    model = random_glm(cfg.with_(eos_token_ids=(stop,)))
    assert generate(model, [PROMPTS[0]], max_new_tokens=10, temperature=0) == [free[: free.index(stop) + 1]]


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = random_glm(small_config(pad_token_id=0))
    greedy = generate(model, PROMPTS, max_new_tokens=12, temperature=0, stop_token_ids=())
    assert generate(model, PROMPTS, 12, temperature=1.3, top_k=1, stop_token_ids=(), seed=1) == greedy
    assert generate(model, PROMPTS, 12, temperature=1.0, top_p=1e-6, stop_token_ids=(), seed=2) == greedy


def test_sampling_is_reproducible_with_a_seed():
    model = random_glm(small_config(pad_token_id=0))
    a = generate(model, PROMPTS, 16, temperature=1.0, top_p=0.95, top_k=50, stop_token_ids=(), seed=123)
    b = generate(model, PROMPTS, 16, temperature=1.0, top_p=0.95, top_k=50, stop_token_ids=(), seed=123)
    c = generate(model, PROMPTS, 16, temperature=1.0, top_p=0.95, top_k=50, stop_token_ids=(), seed=124)
    assert a == b and a != c
    gen = torch.Generator().manual_seed(123)
    assert generate(model, PROMPTS, 16, top_p=0.95, top_k=50, stop_token_ids=(), generator=gen) == a


def test_tensor_input_mode_restored_and_edge_cases():
    model = random_glm(small_config(pad_token_id=0)).train()
    as_list = generate(model, [PROMPTS[0]] * 2, 8, temperature=0, stop_token_ids=())
    assert model.training  # restored
    as_tensor = generate(model.eval(), torch.tensor([PROMPTS[0]] * 2), 8, temperature=0, stop_token_ids=())
    assert not model.training
    assert as_list == as_tensor and as_list[0] == as_list[1]
    assert generate(model, PROMPTS, 0) == [[], [], []]
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 4)


def test_sample_next_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    top_p = sample_next(logits, top_p=0.7, generator=gen)
    assert set(top_p.tolist()) == {0, 1}  # 0.5 < 0.7 needs the second token, never the third
    top_k = sample_next(logits, top_k=3, generator=gen)
    assert set(top_k.tolist()) == {0, 1, 2}
    assert abs((top_k == 0).float().mean().item() - 0.5 / 0.95) < 0.04  # renormalised over the kept tokens
    assert sample_next(logits[:2], temperature=0).tolist() == [0, 0]
