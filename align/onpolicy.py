"""On-policy preference pairs: k answers per prompt from the current policy, labelled, best vs worst of k.

The pairs iterative DPO / RPO trains on (Pang et al. 2024; Xiong et al. 2024's rejection-sampling pairs):

1. ``sample_k``: ``k`` answers per prompt from the policy folder at temperature ``t``
   (``annotation.tasks.sample_responses``: our GLM, KV-cached, stops at GLM's turn terminators);
2. ``label_answers``: one score per answer from a labeller —
   - ``checker``: the world's checker, 1 for a correct answer and 0 otherwise;
   - ``rule``: the world's noise-free preference rule (``PreferenceRule.utility``: correctness, language,
     concision), the rule the simulated annotators follow;
   - ``annotators``: a panel of simulated annotators (``label.noise`` each) judges every pair of the k
     answers; an answer's score is its share of wins (a Borda count; ties and "both bad" count half);
   - ``rm``: the reward model's score minus ``length_penalty`` x characters (a length control: an RM
     labeller without it is hacked by longer answers, docs/align_dpo.md);
3. ``best_worst_records``: per prompt the highest- against the lowest-scored distinct answer, kept when
   the gap exceeds ``min_gap`` (with ``checker`` labels and ``min_gap`` 0: a right answer against a wrong one).

``build_onpolicy_pairs(specs, sample_fn, k, score_fn, min_gap)`` runs the three steps with any sampler and
labeller (the tests plant both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

LabelSource = Literal["checker", "rule", "annotators", "rm"]
Answers = dict[str, list[str]]  # prompt uid -> its k answers
Scores = dict[str, list[float]]  # prompt uid -> one score per answer


def world_specs(world, split: str, n: int, seed: int, families: Sequence[str] = (), phrasings=None):
    """``n`` world prompts of ``split`` as annotation ``PromptSpec``s (the world prompt kept in ``meta``),
    kept to ``families`` when given."""
    from glmwb.annotation.tasks import PromptSpec

    return [
        PromptSpec(p.id, [dict(m) for m in p.messages], "world", {"world_prompt": p.to_dict()})
        for p in world.prompts(split, n, seed=seed, phrasings=phrasings)
        if not families or p.family in families
    ]


def sample_k(
    specs, policy: str, k: int, temperature: float = 1.0, max_new_tokens: int = 48, seed: int = 0,
    top_p: float = 1.0, batch_size: int = 64, progress: bool = False,
) -> Answers:  # fmt: skip
    """``k`` sampled answers per prompt from the policy folder: {uid: [text, ...]}."""
    from glmwb.annotation.tasks import SamplingConfig, sample_responses

    cfg = SamplingConfig(k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         batch_size=batch_size, seed=seed)  # fmt: skip
    got = sample_responses(specs, policy, cfg, progress=progress)
    return {uid: [a.text for a in rows] for uid, rows in got.items()}


def _world_prompt(spec):
    from glmwb.pretrain.world import Prompt

    return Prompt.from_dict(spec.meta["world_prompt"])


def annotator_scores(
    specs, answers: Answers, n_annotators: int = 3, noise: float = 0.1, seed: int = 0
) -> Scores:
    """Each answer's share of wins over the other answers of its prompt, by a simulated annotator panel."""
    from glmwb.annotation.annotators import _panel

    panel = _panel(n_annotators, noise, seed)
    out: Scores = {}
    for spec in specs:
        prompt, texts = _world_prompt(spec), answers[spec.uid]
        wins = [0.0] * len(texts)
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                for judge in panel:
                    label = judge.judge(prompt, texts[i], texts[j])
                    wins[i] += 1.0 if label == "A" else 0.0 if label == "B" else 0.5
                    wins[j] += 1.0 if label == "B" else 0.0 if label == "A" else 0.5
        games = max(1, (len(texts) - 1) * len(panel))
        out[spec.uid] = [w / games for w in wins]
    return out


def label_answers(
    source: LabelSource, specs, answers: Answers, scorer=None, length_penalty: float = 0.0,
    n_annotators: int = 3, noise: float = 0.1, seed: int = 0,
) -> Scores:  # fmt: skip
    """One score per answer from the labeller ``source`` (see the module docstring)."""
    from glmwb.pretrain.world import check

    if source == "annotators":
        return annotator_scores(specs, answers, n_annotators, noise, seed)
    if source == "rm":
        if scorer is None:
            raise ValueError("label_answers: source 'rm' needs a reward scorer")
        flat = [(s, t) for s in specs for t in answers[s.uid]]
        got = scorer.score([s.messages for s, _ in flat], [t or " " for _, t in flat])
        out: Scores = {s.uid: [] for s in specs}
        for (s, t), r in zip(flat, got, strict=True):
            out[s.uid].append(float(r) - length_penalty * len(t))
        return out
    if source == "checker":
        return {s.uid: [float(check(_world_prompt(s), t).correct) for t in answers[s.uid]] for s in specs}
    if source == "rule":
        from glmwb.annotation.annotators import PreferenceRule

        rule = PreferenceRule()
        return {s.uid: [rule.utility(check(_world_prompt(s), t)) for t in answers[s.uid]] for s in specs}
    raise ValueError(f"unknown label source {source!r}; one of checker, rule, annotators, rm")


def best_worst_records(
    specs, answers: Answers, scores: Scores, min_gap: float, source: str
) -> tuple[list, int]:
    """One record per prompt: the highest- over the lowest-scored distinct non-empty answer (gap > min_gap).
    Returns (records, prompts without a pair)."""
    from glmwb.annotation.records import PreferenceRecord

    records, skipped = [], 0
    for spec in specs:
        cands = [(s, t) for t, s in zip(answers[spec.uid], scores[spec.uid], strict=True) if t.strip()]
        if len({t for _, t in cands}) < 2:
            skipped += 1
            continue
        best = max(cands, key=lambda x: x[0])
        worst = min(cands, key=lambda x: x[0])
        if best[0] - worst[0] <= min_gap or best[1] == worst[1]:
            skipped += 1
            continue
        records.append(
            PreferenceRecord.from_dict(
                {
                    "prompt": spec.messages,
                    "chosen": best[1],
                    "rejected": worst[1],
                    "margin": float(best[0] - worst[0]),
                    "provenance": {"source": f"online:{source}", "prompt_id": spec.uid},
                },
                where=f"on-policy pair for {spec.uid}",
            )  # fmt: skip
        )
    return records, skipped


def build_onpolicy_pairs(
    specs,
    sample_fn: Callable[[Sequence[Any], int], Answers],
    k: int,
    score_fn: Callable[[Sequence[Any], Answers], Scores],
    min_gap: float = 0.0,
    source: str = "",
) -> tuple[list, dict[str, Any]]:
    """Sample ``k`` answers per prompt (``sample_fn(specs, k)``), score them (``score_fn(specs, answers)``),
    and pair each prompt's best with its worst. Returns (records, facts: prompts, answers, pairs, prompts
    without a pair, the chosen and rejected answers' mean scores)."""
    if k < 2:
        raise ValueError(f"k must be >= 2 (a pair needs two answers), got {k}")
    answers = sample_fn(specs, k)
    short = [uid for uid, rows in answers.items() if len(rows) != k]
    if short or set(answers) != {s.uid for s in specs}:
        raise ValueError(f"the sampler returned other than {k} answers for prompts {short[:3]}")
    scores = score_fn(specs, answers)
    records, skipped = best_worst_records(specs, answers, scores, min_gap, source)
    facts = {
        "prompts": len(specs), "answers": sum(len(v) for v in answers.values()), "pairs": len(records),
        "prompts_without_pair": skipped,
        "mean_score": sum(sum(v) for v in scores.values()) / max(1, sum(len(v) for v in scores.values())),
    }  # fmt: skip
    return records, facts
