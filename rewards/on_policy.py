"""How well does a reward model rank a *policy's own samples*? The embedded world grades them.

Held-out accuracy on the world's candidate answers says how an RM does on templated sentences; PPO
optimises it on what the policy samples, which looks different (bare numbers, half sentences, the wrong
entity). This samples ``k`` answers per held-out world prompt from a policy, grades each with the world's
checker, and reports per reward model: of the (right, wrong) pairs of the same prompt, the share the RM
orders right, and the accuracy of its best-of-k pick (docs/rewards.md).

    python -m glmwb.rewards.on_policy --policy runs/quickstart/sft/final \
        --rm runs/quickstart/reward/final [--rm another/final ...] [--k 4] [--out report.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def ranking_stats(scores: Tensor, correct: Tensor) -> dict[str, float]:
    """scores, correct: (P, k) rewards and right/wrong of k answers to each of P prompts.

    ``right_over_wrong``: over all (right, wrong) pairs of the same prompt, the share with the right one
    scored higher (a tie counts half); ``best_of_k``: the share of prompts whose top-scored answer is right;
    ``pairs``: how many (right, wrong) pairs there were."""
    if scores.shape != correct.shape or scores.dim() != 2:
        raise ValueError(
            f"scores {tuple(scores.shape)} and correct {tuple(correct.shape)} must both be (P, k)"
        )
    good, pairs = 0.0, 0
    for s, c in zip(scores.tolist(), correct.bool().tolist(), strict=True):
        for a, b in itertools.combinations(range(len(s)), 2):
            if c[a] != c[b]:
                right, wrong = (a, b) if c[a] else (b, a)
                pairs += 1
                good += 1.0 if s[right] > s[wrong] else 0.5 if s[right] == s[wrong] else 0.0
    best = correct.bool().gather(1, scores.argmax(1, keepdim=True)).float().mean().item()
    return {"pairs": pairs, "right_over_wrong": good / pairs if pairs else float("nan"), "best_of_k": best}


def sample_and_grade(
    policy: str | Path,
    world_seed: int = 0,
    num_entities: int = 96,
    split: str = "test",
    n: int = 600,
    families: Sequence[str] = ("fact", "conversion"),
    k: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
) -> tuple[list, list[list[str]], Tensor]:
    """(prompts, answers per prompt (k each), correct (P, k)) for ``k`` samples per held-out world prompt."""
    from glmwb.pretrain.generate import generate_answers, load_policy
    from glmwb.pretrain.world import make_world

    world = make_world(seed=world_seed, num_entities=num_entities)
    prompts = [p for p in world.prompts(split, n) if p.family in families]
    if not prompts:
        raise ValueError(f"no {split!r} prompts of families {list(families)} among {n}")
    model, tok = load_policy(policy)
    runs = [
        generate_answers(
            model, tok, [p.messages for p in prompts], max_new_tokens, temperature, seed=seed + 1000 * j
        )
        for j in range(k)
    ]
    answers = [[runs[j][i] for j in range(k)] for i in range(len(prompts))]
    graded = zip(prompts, answers, strict=True)
    correct = torch.tensor([[world.check(p, a).correct for a in row] for p, row in graded])
    return prompts, answers, correct


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True, help="a policy folder (SFT / PPO final/)")
    ap.add_argument("--rm", action="append", required=True, help="a reward folder; repeat to compare")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument(
        "--n", type=int, default=600, help="prompts drawn from the split before the family filter"
    )
    ap.add_argument("--split", default="test")
    ap.add_argument("--families", default="fact,conversion")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--num-entities", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)
    if args.k < 2:
        ap.error("--k must be at least 2 (pairs of answers to the same prompt)")
    from glmwb.rewards.scoring import RewardScorer

    prompts, answers, correct = sample_and_grade(
        args.policy, args.world_seed, args.num_entities, args.split, args.n,
        args.families.split(","), args.k, args.temperature, seed=args.seed,
    )  # fmt: skip
    report: dict[str, Any] = {
        "policy": str(args.policy),
        "prompts": len(prompts),
        "k": args.k,
        "sample_accuracy": correct.float().mean().item(),
        "any_right": correct.any(1).float().mean().item(),
        "reward_models": {},
    }
    print(
        f"{len(prompts)} prompts x {args.k} samples: sample accuracy {report['sample_accuracy']:.3f}, "
        f"at least one right {report['any_right']:.3f}"
    )
    print(f"| reward model | right > wrong ({{pairs}}) | best-of-{args.k} accuracy |\n|---|---|---|")
    flat_prompts = [p.messages for p in prompts for _ in range(args.k)]
    flat_answers = [a if a.strip() else "." for row in answers for a in row]  # the scorer refuses empty ones
    for rm in args.rm:
        scores = RewardScorer.from_pretrained(rm).score_all(flat_prompts, flat_answers)[:, 0]
        stats = ranking_stats(scores.view(len(prompts), args.k), correct)
        report["reward_models"][rm] = stats
        print(f"| {rm} | {stats['right_over_wrong']:.3f} ({stats['pairs']}) | {stats['best_of_k']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
