"""Packed (padding-free) DPO: the packed rows compute exactly what the padded batch computes; the losses
match hand-computed values; the packed loop trains."""

from __future__ import annotations

import math
import random

import pytest
import torch

from glmwb.align.packed_dpo import (
    LOSSES,
    PackedSettings,
    PairLogps,
    chosen_nll,
    preference_loss,
    reference_logps,
    rpo_loss,
    train_packed,
)
from glmwb.pretrain.config import GLMConfig
from glmwb.pretrain.model import GLM
from glmwb.pretrain.packing import PairTokens, encode_pair, pack_batch, pad_batch, pair_logps
from tests.tiny import one_thread  # noqa: F401 (one_thread: autouse fixture)

CFG = GLMConfig(
    vocab_size=211, hidden_size=48, intermediate_size=72, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=12, max_position_embeddings=256,
)  # fmt: skip


def random_pairs(n: int, seed: int = 0) -> list[PairTokens]:
    """Length-varied pairs: prompts 1..23 tokens, responses 1..41 (odd, non-power-of-two sizes)."""
    rng = random.Random(seed)
    ids = lambda k: tuple(rng.randrange(10, CFG.vocab_size) for _ in range(k))  # noqa: E731
    return [
        PairTokens(ids(rng.randint(1, 23)), ids(rng.randint(1, 41)), ids(rng.randint(1, 41)))
        for _ in range(n)
    ]


def model(seed: int = 0) -> GLM:
    torch.manual_seed(seed)
    return GLM(CFG).float()


def test_pack_layout_keeps_rows_short_and_sequences_whole():
    pairs = random_pairs(9)
    b = pack_batch(pairs, pad_id=0, row_tokens=64)
    assert b.input_ids.shape[1] <= 64 and b.num_seqs == 18
    for s, (ids, plen) in enumerate(
        [(list(p.prompt_ids + r), len(p.prompt_ids)) for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    ):
        where = (b.doc_ids == s).nonzero()
        assert len(where) == len(ids) and where[:, 0].unique().numel() == 1  # one row, contiguous
        row, cols = int(where[0, 0]), where[:, 1]
        assert b.input_ids[row, cols].tolist() == ids
        assert int((b.seq_index == s).sum()) == len(ids) - plen == int(b.lengths[s])
    assert b.real_tokens == sum(p.num_tokens for p in pairs)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_packed_equals_padded_loss_and_gradients(loss):
    pairs = random_pairs(7, seed=1)
    ref = (torch.randn(7, dtype=torch.float64).float() * 3, torch.randn(7).float() * 3)
    grads, losses = [], []
    for batch in (pad_batch(pairs, 0), pack_batch(pairs, 0, row_tokens=80)):
        m = model()
        c, r = pair_logps(m, batch)
        lens = batch.lengths.float()
        p = PairLogps(c, r, ref[0], ref[1], lens[0::2], lens[1::2])
        value = preference_loss(loss, p, beta=0.3, label_smoothing=0.1, simpo_gamma=0.4)
        value.backward()
        losses.append(value.detach())
        grads.append({n: q.grad.clone() for n, q in m.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_sequence_logps_match_a_plain_forward_per_sequence():
    pairs = random_pairs(3, seed=2)
    m = model()
    c, r = pair_logps(m, pack_batch(pairs, 0, row_tokens=64))
    for i, p in enumerate(pairs):
        for resp, got in ((p.chosen_ids, c[i]), (p.rejected_ids, r[i])):
            ids = torch.tensor([p.prompt_ids + resp])
            logp = m(ids).logits.float().log_softmax(-1)[0]
            P = len(p.prompt_ids)
            want = logp[P - 1 : -1].gather(-1, ids[0, P:, None]).sum()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_losses_against_hand_computed_values():
    p = PairLogps(
        chosen=torch.tensor([-10.0]), rejected=torch.tensor([-14.0]), ref_chosen=torch.tensor([-11.0]),
        ref_rejected=torch.tensor([-12.0]), chosen_len=torch.tensor([4.0]), rejected_len=torch.tensor([8.0]),
    )  # fmt: skip
    h, beta, e = (-10 + 11) - (-14 + 12), 0.5, 0.2  # h = 3
    ls = lambda x: -math.log1p(math.exp(-x))  # noqa: E731  log sigmoid
    want = {
        "sigmoid": -ls(beta * h),
        "ipo": ((1 / 4 - (-2) / 8) - 1 / (2 * beta)) ** 2,
        "robust": (-(1 - e) * ls(beta * h) + e * ls(-beta * h)) / (1 - 2 * e),
        "cdpo": -(1 - e) * ls(beta * h) - e * ls(-beta * h),
        "hinge": max(0.0, 1 - beta * h),
        "simpo": -ls(beta * (-10 / 4 - -14 / 8) - 0.3),
    }
    for name, value in want.items():
        got = preference_loss(name, p, beta, label_smoothing=e, simpo_gamma=0.3)
        assert float(got) == pytest.approx(value, rel=1e-6), name
    with pytest.raises(ValueError, match="unknown DPO loss"):
        preference_loss("nope", p, beta)


def test_rpo_nll_term_against_a_hand_computation():
    """RPO = DPO + w x (minus the chosen answers' token log-probs / their tokens), pooled over the batch."""
    p = PairLogps(
        chosen=torch.tensor([-6.0, -2.0]), rejected=torch.tensor([-9.0, -3.0]),
        ref_chosen=torch.tensor([-7.0, -2.5]), ref_rejected=torch.tensor([-8.0, -3.0]),
        chosen_len=torch.tensor([3.0, 1.0]), rejected_len=torch.tensor([5.0, 2.0]),
    )  # fmt: skip
    nll = (6.0 + 2.0) / (3 + 1)  # = 2.0 (the mean of per-answer means would be (2 + 2) / 2 here too)
    assert float(chosen_nll(p)) == pytest.approx(nll)
    beta, w = 0.1, 0.5
    h = [(-6 + 7) - (-9 + 8), (-2 + 2.5) - (-3 + 3)]  # 2.0 and 0.5
    dpo = sum(math.log1p(math.exp(-beta * x)) for x in h) / 2
    assert float(rpo_loss("sigmoid", p, beta, sft_weight=w)) == pytest.approx(dpo + w * nll, rel=1e-6)
    assert float(rpo_loss("sigmoid", p, beta, sft_weight=0.0)) == pytest.approx(dpo, rel=1e-6)
    p2 = PairLogps(
        p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, torch.tensor([1.0, 3.0]), p.rejected_len
    )
    assert float(chosen_nll(p2)) == pytest.approx(8.0 / 4)  # pooled: same total tokens, same value
    p3 = PairLogps(
        p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, torch.tensor([3.0, 5.0]), p.rejected_len
    )
    assert float(chosen_nll(p3)) == pytest.approx(8.0 / 8)


def test_rpo_nll_term_on_a_model_equals_the_chosen_tokens_mean_nll():
    """The NLL term from packed log-probs equals a plain forward's mean token NLL over the chosen answers."""
    pairs = random_pairs(3, seed=4)
    m = model()
    c, r = pair_logps(m, pack_batch(pairs, 0, row_tokens=64))
    total, tokens = 0.0, 0
    for pr in pairs:
        ids = torch.tensor([pr.prompt_ids + pr.chosen_ids])
        logp = m(ids).logits.float().log_softmax(-1)[0]
        P = len(pr.prompt_ids)
        total -= float(logp[P - 1 : -1].gather(-1, ids[0, P:, None]).sum())
        tokens += len(pr.chosen_ids)
    lens = torch.tensor([float(len(pr.chosen_ids)) for pr in pairs])
    got = chosen_nll(PairLogps(c, r, None, None, lens, torch.ones(3)))
    assert float(got) == pytest.approx(total / tokens, rel=1e-4)


def test_packed_loop_trains_and_raises_the_margin():
    pairs = random_pairs(16, seed=3)
    m = model(1)
    before = {n: q.detach().clone() for n, q in m.named_parameters()}
    c0, r0 = reference_logps(m, pairs, pad_id=0)
    out = train_packed(m, pairs, 0, PackedSettings(batch_size=8, max_steps=12, log_every=4, lr=3e-3,
                                                  warmup_steps=1, row_tokens=96), log=lambda s: None)  # fmt: skip
    assert out["steps"] == 12 and all(math.isfinite(h["loss"]) for h in out["history"])
    assert out["history"][-1]["loss"] < out["history"][0]["loss"]
    assert all(not torch.equal(before[n], q) for n, q in m.named_parameters())
    c1, r1 = reference_logps(m, pairs, pad_id=0)
    assert float(((c1 - c0) - (r1 - r0)).mean()) > 0


def test_encode_pair_keeps_the_terminator(tiny_tokenizer):
    from glmwb.pretrain.tokenizer import encode_chat

    prompt = [{"role": "user", "content": "2+2? <|user|>"}]
    p = encode_pair(tiny_tokenizer, prompt, "4", "five")
    eos = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert p.chosen_ids[-1] == eos and p.rejected_ids[-1] == eos
    full = encode_chat(tiny_tokenizer, [*prompt, {"role": "assistant", "content": "4"}])
    assert list(p.prompt_ids + p.chosen_ids) == full["input_ids"]
    assert [i for i, m in zip(full["input_ids"], full["assistant_mask"], strict=True) if m] == list(
        p.chosen_ids
    )
