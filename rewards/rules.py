"""Verifiable ("rule") rewards and their weighted combination with reward-model scores.

Each rule is a plain function ``(response, context) -> float``:

==================  ==========================================================================================
``world_correct``   1 if the embedded world's checker finds the gold answer as the response's final answer
``world_score``     the world's utility: 0.6 correct + 0.25 right language + 0.15 concision, in [0, 1]
``world_on_topic``  1 if the response answers the question asked, right or wrong (``World.on_topic``: an
                    answer of the asked type, about the asked subject / with the question's own numbers)
``gsm8k``           1 if the final number (after ``####``, else the last number) equals the gold number
``exact``           1 if the final answer equals the gold answer (numbers numerically, words normalised)
``format``          1 if the response is well-formed (``format_problems`` is empty), else 0
``length``          a penalty <= 0: -(chars over budget) / budget, capped at -1
==================  ==========================================================================================

``CombinedReward({"gsm8k": 1.0, "format": 0.2}, scorer=RewardScorer..., rm_weight=0.5)`` sums
``weight x rule`` and ``rm_weight x RM score`` per response, and can report every term (``breakdown``).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from glmwb.pretrain.tokenizer import SPECIAL_TOKENS
from glmwb.pretrain.world.checking import check, detect_language, find_numbers, on_topic
from glmwb.pretrain.world.prompts import Prompt

GSM8K_FINAL = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


@dataclass(frozen=True)
class RuleContext:
    """What a rule may know about the prompt: a world prompt (for the world's checker), a gold answer, the
    expected language, and a character budget for the length penalty."""

    prompt: Any = None  # chat messages or text (informational)
    world_prompt: Prompt | None = None
    gold: str | None = None
    lang: str | None = None  # "en" / "zh": the format rule then checks the response's language
    length_budget: int | None = (
        None  # characters; default: the world's (1.5 x reference + 10), 4 x gold + 20, 400
    )
    extra: Mapping[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Final answers


def gsm8k_gold(answer: str) -> str:
    """The gold number of a GSM8K ``answer`` field (after the final ``#### ``)."""
    matches = GSM8K_FINAL.findall(answer)
    if not matches:
        raise ValueError(f"no '#### N' final answer in {answer[-80:]!r}")
    return matches[-1].replace(",", "")


def final_number(text: str, strict: bool = False) -> float | None:
    """The final numeric answer: the number after the last ``####`` when there is one; otherwise (unless
    ``strict``) the last number in the text (Arabic or Chinese numerals, thousands commas, full width)."""
    matches = GSM8K_FINAL.findall(unicodedata.normalize("NFKC", text))
    if matches:
        return float(matches[-1].replace(",", ""))
    if strict:
        return None
    numbers = find_numbers(text)
    return numbers[-1][1] if numbers else None


def numbers_equal(a: float | None, b: float | None, rel: float = 1e-6) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower().strip()
    return re.sub(r"[\s\.,!?;:。，！？；：、\"'“”‘’()（）]+", " ", text).strip()


# ----------------------------------------------------------------------------------------------------------
# Rules


def world_correct(response: str, ctx: RuleContext) -> float:
    if ctx.world_prompt is None:
        raise ValueError("rule 'world_correct' needs context.world_prompt (a pretrain.world.Prompt)")
    return float(check(ctx.world_prompt, response).correct)


def world_score(response: str, ctx: RuleContext) -> float:
    if ctx.world_prompt is None:
        raise ValueError("rule 'world_score' needs context.world_prompt (a pretrain.world.Prompt)")
    return float(check(ctx.world_prompt, response).score)


def world_on_topic(response: str, ctx: RuleContext) -> float:
    if ctx.world_prompt is None:
        raise ValueError("rule 'world_on_topic' needs context.world_prompt (a pretrain.world.Prompt)")
    return float(on_topic(ctx.world_prompt, response))


def gsm8k(response: str, ctx: RuleContext) -> float:
    """1 if the response's final number equals the gold number (``ctx.gold``: a number or a GSM8K answer
    field with ``#### N``)."""
    if ctx.gold is None:
        raise ValueError("rule 'gsm8k' needs context.gold")
    gold = float(gsm8k_gold(ctx.gold)) if "####" in ctx.gold else float(ctx.gold.replace(",", ""))
    return float(numbers_equal(final_number(response), gold))


def exact(response: str, ctx: RuleContext) -> float:
    """1 if the final answer is the gold one: numbers compared numerically (last number in the response),
    words after normalising case, width and punctuation (the response, or its last line, ends with it)."""
    if ctx.gold is None:
        raise ValueError("rule 'exact' needs context.gold")
    gold_numbers = find_numbers(ctx.gold)
    if gold_numbers and _normalise(ctx.gold) == _normalise(gold_numbers[-1][2]):
        return float(numbers_equal(final_number(response), gold_numbers[-1][1]))
    gold, text = (
        _normalise(ctx.gold),
        _normalise(response.strip().splitlines()[-1] if response.strip() else ""),
    )
    return float(
        text == gold
        or text.endswith(" " + gold)
        or (bool(re.search(r"[\u4e00-\u9fff]", gold)) and text.endswith(gold))
    )


_CONTROL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def format_problems(
    response: str, ctx: RuleContext | None = None, require_final_answer: bool = False
) -> list[str]:
    """What is wrong with the response's form (empty list = well formed): empty, leaked control tokens
    (``<|user|>`` ... a GLM turn must end at the terminator, not contain one), replacement characters,
    a long run of one repeated character, the wrong language (when ``ctx.lang`` is set), no ``#### N``
    final answer (when ``require_final_answer``)."""
    problems = []
    if not response.strip():
        return ["empty"]
    if _CONTROL.search(response):
        problems.append("control token in text")
    if "\ufffd" in response:
        problems.append("replacement character")
    if re.search(r"(.)\1{19,}", response):
        problems.append("repeated character run")
    if ctx is not None and ctx.lang is not None:
        lang = detect_language(response)
        if lang is not None and lang != ctx.lang:
            problems.append(f"language {lang}, expected {ctx.lang}")
    if require_final_answer and final_number(response, strict=True) is None:
        problems.append("no '#### N' final answer")
    return problems


def format_ok(response: str, ctx: RuleContext) -> float:
    return float(not format_problems(response, ctx, bool(ctx.extra.get("require_final_answer"))))


def length_penalty(response: str, ctx: RuleContext) -> float:
    """-(len - budget) / budget for responses longer than the budget (characters), capped at -1; else 0."""
    budget = ctx.length_budget
    if budget is None and ctx.world_prompt is not None:  # the world's own concision budget
        budget = int(1.5 * len(ctx.world_prompt.reference) + 10)
    if budget is None:
        budget = 4 * len(ctx.gold) + 20 if ctx.gold else 400
    over = len(response.strip()) - budget
    return -min(1.0, over / budget) if over > 0 else 0.0


RULES: dict[str, Callable[[str, RuleContext], float]] = {
    "world_correct": world_correct,
    "world_score": world_score,
    "world_on_topic": world_on_topic,
    "gsm8k": gsm8k,
    "exact": exact,
    "format": format_ok,
    "length": length_penalty,
}


# ----------------------------------------------------------------------------------------------------------
# Combination with a reward model


class CombinedReward:
    """reward = sum_rule w_rule x rule(response, context) + rm_weight x RM(prompt, response).

    ``weights``: rule name (``RULES``) -> weight. ``scorer``: anything with ``score(prompts, responses)``
    (``RewardScorer`` in-process, or ``RewardClient`` over HTTP); ``normalize_rm`` standardises its scores with
    the reward mean / std saved in the reward folder, so weights compare like with like.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        scorer: Any = None,
        rm_weight: float = 0.0,
        normalize_rm: bool = True,
    ) -> None:
        unknown = sorted(set(weights) - set(RULES))
        if unknown:
            raise ValueError(f"unknown rule(s) {unknown}; known: {', '.join(RULES)}")
        if rm_weight and scorer is None:
            raise ValueError("rm_weight is set but no scorer was given")
        self.weights, self.scorer, self.rm_weight, self.normalize_rm = (
            dict(weights),
            scorer,
            rm_weight,
            normalize_rm,
        )

    def breakdown(
        self, prompts: Sequence[Any], responses: Sequence[str], contexts: Sequence[RuleContext] | None = None
    ) -> list[dict[str, float]]:
        """Per response: every weighted term and their sum ("total")."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        contexts = contexts or [RuleContext(prompt=p) for p in prompts]
        rm = [0.0] * len(responses)
        if self.rm_weight:
            kwargs = {"normalize": True} if self.normalize_rm else {}
            rm = self.scorer.score(list(prompts), list(responses), **kwargs)
        out = []
        for response, ctx, r in zip(responses, contexts, rm, strict=True):
            terms = {name: w * RULES[name](response, ctx) for name, w in self.weights.items()}
            if self.rm_weight:
                terms["rm"] = self.rm_weight * float(r)
            terms["total"] = sum(terms.values())
            out.append(terms)
        return out

    def __call__(
        self, prompts: Sequence[Any], responses: Sequence[str], contexts: Sequence[RuleContext] | None = None
    ) -> list[float]:
        return [t["total"] for t in self.breakdown(prompts, responses, contexts)]
