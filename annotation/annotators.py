"""Simulated annotators: a documented preference rule with noise, and the labelled pairs they produce.

``SimulatedAnnotator(rule, noise, seed).judge(prompt, a, b)`` applies ``PreferenceRule`` (by default the
same weights as the world checker's ``score``): "both_bad" when neither answer is correct; else "tie" when
the utilities differ by at most ``tie_tolerance`` (0.03); else the answer with the higher utility, "A" or
"B". With probability ``noise`` the label is replaced by one drawn uniformly from the four labels (it may
coincide with the rule's). The draw is seeded by (annotator seed, prompt id, both texts), so re-asking gives
the same label. ``agreement_ceiling(noise)`` is the expected agreement of such an annotator with the
noise-free rule: 1 - 3p/4 over all labels, and (1 - 3p/4) / (1 - p/2) over the strict (A/B) labels when
both the rule and the annotator are strict, which is the best pairwise accuracy a reward model can have on
held-out labels. ``judge_with_strength`` also says how much better a strict winner is, on ``records``'
four-point scale (negligible / slight / clear / strong) from the utility gap: a filler-padded loser is a
slight loss, the other language a clear one, a wrong value a strong one; a random (noisy) label gets a
random strength.

``preference_pairs(world, prompts, ...)`` has a panel of such annotators label pairs of the embedded world's
candidate answers (``World.responses``, or minimal pairs from ``World.contrast_responses`` named as in
``contrast_pairs``) and returns ``records.PreferenceRecord`` dicts. Stdlib only, deterministic by seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from glmwb.annotation.records import STRENGTH_MARGINS, STRENGTHS
from glmwb.pretrain.world.checking import Check, check
from glmwb.pretrain.world.responses import CONTRAST_KINDS, KINDS
from glmwb.pretrain.world.seeding import digest, seeded_rng

if TYPE_CHECKING:
    from glmwb.pretrain.world.model import World
    from glmwb.pretrain.world.prompts import Prompt
    from glmwb.pretrain.world.responses import Response

LABELS = ("A", "B", "tie", "both_bad")


@dataclass(frozen=True)
class PreferenceRule:
    """The noise-free preference between two answers to one prompt.

    utility = correctness x correct + language x right_language + concision x concision (as in ``Check``);
    "both_bad" when neither answer is correct (and ``both_bad`` is on); "tie" when the utilities differ by
    at most ``tie_tolerance``; otherwise "A" or "B", whichever has the higher utility.
    """

    correctness: float = 0.6
    language: float = 0.25
    concision: float = 0.15
    tie_tolerance: float = 0.03
    both_bad: bool = True
    # utility gaps from which a strict preference is "slight", "clear", "strong" (below the first:
    # "negligible"): with the weights above filler costs 0.075-0.15 (slight), the other language about
    # 0.25 (clear) and a wrong value at least 0.45 (strong)
    strength_cuts: tuple[float, float, float] = (0.05, 0.2, 0.45)

    def utility(self, c: Check) -> float:
        return self.correctness * c.correct + self.language * c.right_language + self.concision * c.concision

    def label(self, a: Check, b: Check) -> str:
        if self.both_bad and not a.correct and not b.correct:
            return "both_bad"
        ua, ub = self.utility(a), self.utility(b)
        if abs(ua - ub) <= self.tie_tolerance:
            return "tie"
        return "A" if ua > ub else "B"

    def strength(self, a: Check, b: Check) -> str | None:
        """How much better the preferred answer is (``annotation.records.STRENGTHS``), from the utility gap;
        None when the label is not strict (tie, both bad)."""
        if self.label(a, b) not in ("A", "B"):
            return None
        gap = abs(self.utility(a) - self.utility(b))
        return STRENGTHS[sum(gap >= cut for cut in self.strength_cuts)]


class SimulatedAnnotator:
    """An annotator that follows ``rule`` and, with probability ``noise``, answers uniformly at random."""

    def __init__(
        self, rule: PreferenceRule | None = None, noise: float = 0.0, seed: int = 0, name: str = ""
    ) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        self.rule = rule or PreferenceRule()
        self.noise = noise
        self.seed = seed
        self.name = name or f"sim-{seed}"

    def judge(self, prompt: Prompt, a_text: str, b_text: str) -> str:
        """The label, "A", "B", "tie" or "both_bad"; the same question always gets the same answer."""
        return self.judge_with_strength(prompt, a_text, b_text)[0]

    def judge_with_strength(self, prompt: Prompt, a_text: str, b_text: str) -> tuple[str, str | None]:
        """(label, strength): the strength of a strict label is the rule's (``PreferenceRule.strength``), or
        uniformly random when the label is (strength None for "tie" and "both_bad")."""
        rng = seeded_rng("annotator", self.seed, prompt.id, a_text, b_text)
        if rng.random() < self.noise:
            label = rng.choice(LABELS)
            return label, (rng.choice(STRENGTHS) if label in ("A", "B") else None)
        a, b = check(prompt, a_text), check(prompt, b_text)
        return self.rule.label(a, b), self.rule.strength(a, b)


def agreement_ceiling(noise: float, kind: str = "label") -> float:
    """Expected agreement of a ``SimulatedAnnotator`` with its noise-free rule.

    kind="label": P(label == rule label) = (1 - p) + p / 4 = 1 - 3p/4 over all four labels.
    kind="pairwise": over items where the rule is strict (A/B) and the annotator's label is strict too,
    P(same choice) = (1 - p + p/4) / (1 - p + p/2) = (1 - 3p/4) / (1 - p/2): a reward model that has learned
    the rule exactly scores this against held-out annotator labels, and no model can expect more.
    """
    p = noise
    if kind == "label":
        return 1.0 - 0.75 * p
    if kind == "pairwise":
        return (1.0 - 0.75 * p) / (1.0 - 0.5 * p)
    raise ValueError(f"kind must be 'label' or 'pairwise', got {kind!r}")


# ---------------------------------------------------------------------------------------------------------
# Minimal pairs: which two of World.contrast_responses' kinds a pair shows.
# ---------------------------------------------------------------------------------------------------------


def contrast_pairs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """The minimal pairs ``specs`` name: 'a>b' each, or 'all' for every pairing of the eleven kinds of
    ``World.contrast_responses`` (55: surface form and value independent, the counterfactual design)."""
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        if spec == "all":
            pairs += [(a, b) for i, a in enumerate(CONTRAST_KINDS) for b in CONTRAST_KINDS[i + 1 :]]
        else:
            pairs.append(_contrast_kinds(spec))
    return pairs


def _contrast_kinds(spec: str) -> tuple[str, str]:
    """'correct>verbose' -> ("correct", "verbose"): two of ``World.contrast_responses``' kinds."""
    parts = spec.split(">") if isinstance(spec, str) else []
    if len(parts) != 2 or parts[0] == parts[1] or any(p not in CONTRAST_KINDS for p in parts):
        raise ValueError(
            f"contrast_kinds: {spec!r} is not two different minimal-pair kinds 'a>b' "
            f"with a and b from {list(CONTRAST_KINDS)} (e.g. 'correct>verbose'), or 'all'"
        )
    return parts[0], parts[1]


# ---------------------------------------------------------------------------------------------------------
# Labelled preference pairs from the world.
# ---------------------------------------------------------------------------------------------------------


def preference_pairs(
    world: World,
    prompts: Sequence[Prompt],
    n_annotators: int = 3,
    noise: float | Sequence[float] = 0.1,
    seed: int = 0,
    labels_per_pair: int = 1,
    contrastive: float = 0.0,
    contrast_kinds: Sequence[str] = ("correct>wrong", "correct>wrong", "correct>verbose"),
    strength: bool = False,
) -> list[dict[str, Any]]:
    """Label one pair of candidate answers per prompt by ``labels_per_pair`` of ``n_annotators`` simulated
    annotators; one record per label.

    ``contrastive`` is the share of prompts whose pair is a minimal pair instead (``World.contrast_responses``:
    one answer sentence with the gold value, with another value, wrapped in filler), its two kinds drawn from
    ``contrast_kinds`` ('correct>wrong', 'correct>verbose', 'verbose>wrong', and the counterfactual
    'correct>verbose_wrong', 'verbose>verbose_wrong', 'wrong>verbose_wrong', 'correct>wrong_language_wrong'
    ...; 'all' for all 55 pairings; repeat one to weight it). The annotators label every pair by their
    rule: 'a>b' names the two kinds shown, not the label (two wrong answers are "both bad").

    ``noise`` is one probability for every annotator or one per annotator (reliable and careless ones).
    Each record is a dict that ``annotation.records.PreferenceRecord.from_dict`` accepts (and its ``to_dict``
    gives back): ``prompt`` (messages), ``chosen`` / ``rejected`` (response text), ``tie`` (True for "tie" and
    "both_bad"; then chosen is simply answer A), ``annotator`` ("sim-i"), ``weight`` 1.0, ``margin`` None,
    ``attributes`` ({"correctness", "language", "concision"} -> +1 when the chosen response is better on
    it, -1 worse, 0 equal), ``id`` ("{prompt_id}/{annotator}") and ``provenance``: ``source`` "world",
    ``seed``, ``world_key``, ``prompt_id``, ``lang``, ``family``, ``label`` (the annotator's: A / B / tie /
    both_bad; A is the answer shown first), ``rule_choice`` (what the noise-free rule prefers: "chosen",
    "rejected", "tie" or "both_bad"), ``noise`` (the annotator's),
    ``kinds`` [chosen, rejected] and ``scores`` ({"chosen": {...}, "rejected": {...}} with correctness,
    language, concision in [0, 1]).

    ``strength``: the annotators also say how much better the chosen answer is
    (``SimulatedAnnotator.judge_with_strength``); a strict record then has ``provenance.strength`` and
    ``margin`` = ``annotation.records.STRENGTH_MARGINS[strength]`` (for a margin loss), ties keep None.
    """
    if not 1 <= labels_per_pair <= n_annotators:
        raise ValueError(
            f"labels_per_pair must be in [1, n_annotators={n_annotators}], got {labels_per_pair}"
        )
    annotators = _panel(n_annotators, noise, seed)
    if not 0.0 <= contrastive <= 1.0:
        raise ValueError(f"contrastive must be a fraction in [0, 1], got {contrastive}")
    contrast = contrast_pairs(contrast_kinds)
    if contrastive and not contrast:
        raise ValueError("contrast_kinds is empty; name at least one minimal pair such as 'correct>wrong'")
    rule = PreferenceRule()
    rng = seeded_rng(world.seed, "pairs", seed)
    records = []
    for prompt in prompts:
        a, b = _draw_pair(world, prompt, rng, contrastive, contrast)
        check_a, check_b = world.check(prompt, a.text), world.check(prompt, b.text)
        rule_label = rule.label(check_a, check_b)
        pair = (a, check_a), (b, check_b)
        for annotator in rng.sample(annotators, labels_per_pair):
            label, level = annotator.judge_with_strength(prompt, a.text, b.text)
            level = level if strength else None
            records.append(_record(world, prompt, seed, annotator, pair, rule_label, label, level))
    return records


def _panel(n_annotators: int, noise: float | Sequence[float], seed: int) -> list[SimulatedAnnotator]:
    """``n_annotators`` annotators "sim-0", "sim-1", ... with one noise for all or one each."""
    noises = [float(noise)] * n_annotators if isinstance(noise, (int, float)) else [float(x) for x in noise]
    if len(noises) != n_annotators:
        raise ValueError(f"noise has {len(noises)} values for n_annotators={n_annotators}")
    return [
        SimulatedAnnotator(noise=p, seed=digest(seed, "annotator", i) % 2**31, name=f"sim-{i}")
        for i, p in enumerate(noises)
    ]


def _draw_pair(
    world: World,
    prompt: Prompt,
    rng: random.Random,
    contrastive: float,
    contrast: Sequence[tuple[str, str]],
) -> tuple[Response, Response]:
    """Answers A and B for ``prompt``: with probability ``contrastive`` a minimal pair of the kinds in
    ``contrast`` (in random order), else two candidates of uniformly drawn kinds (the same kind twice means
    two different draws)."""
    if contrastive and rng.random() < contrastive:
        options = world.contrast_responses(prompt, seed=rng.randrange(2**31))
        kind_a, kind_b = rng.choice(contrast)
        a, b = options[kind_a], options[kind_b]
        return (b, a) if rng.random() < 0.5 else (a, b)
    kind_a, kind_b = rng.choice(KINDS), rng.choice(KINDS)
    a = world.responses(prompt, seed=rng.randrange(2**31))[KINDS.index(kind_a)]
    b = world.responses(prompt, seed=rng.randrange(2**31))[KINDS.index(kind_b)]
    return a, b


def _record(
    world: World,
    prompt: Prompt,
    seed: int,
    annotator: SimulatedAnnotator,
    pair: tuple[tuple[Response, Check], tuple[Response, Check]],
    rule_label: str,
    label: str,
    level: str | None,
) -> dict[str, Any]:
    """One annotator's ``label`` (and strength ``level``) of the answers A and B in ``pair`` (each with its
    check) as a ``PreferenceRecord`` dict (see ``preference_pairs``); ``rule_label`` is the noise-free rule's."""
    a, b = pair
    swap = label == "B"
    rule_choice = (
        rule_label
        if rule_label in ("tie", "both_bad")
        else ("chosen" if (rule_label == "A") != swap else "rejected")
    )
    (chosen, c_chosen), (rejected, c_rejected) = (b, a) if swap else (a, b)
    scores = {
        side: {"correctness": float(c.correct), "language": float(c.right_language), "concision": c.concision}
        for side, c in (("chosen", c_chosen), ("rejected", c_rejected))
    }
    return {
        "prompt": [dict(m) for m in prompt.messages],
        "chosen": chosen.text,
        "rejected": rejected.text,
        "tie": label in ("tie", "both_bad"),
        "annotator": annotator.name,
        "weight": 1.0,
        "margin": None if level is None else STRENGTH_MARGINS[level],
        "attributes": {k: _sign(scores["chosen"][k] - scores["rejected"][k]) for k in scores["chosen"]},
        "provenance": {
            "source": "world",
            "seed": seed,
            "world_key": [world.seed, world.num_entities],
            "prompt_id": prompt.id,
            "lang": prompt.lang,
            "family": prompt.family,
            "label": label,
            "rule_choice": rule_choice,
            "noise": annotator.noise,
            "kinds": [chosen.kind, rejected.kind],
            "scores": scores,
            **({"strength": level} if level else {}),
        },
        "id": f"{prompt.id}/{annotator.name}",
    }


def _sign(x: float, tolerance: float = 1e-9) -> int:
    return 0 if abs(x) <= tolerance else (1 if x > 0 else -1)
