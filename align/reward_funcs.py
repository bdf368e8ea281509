"""Our rewards as TRL reward functions (GRPOTrainer / RLOOTrainer).

TRL 1.16 calls every reward function once per generation batch as

    f(prompts=[...], completions=[...], completion_ids=[...], trainer_state=..., log_extra=..., log_metric=...,
      **dataset_columns) -> list[float | None]

with one entry per completion (each prompt repeated ``num_generations`` times, its dataset columns with it).
For conversational data a prompt is a list of chat messages and a completion is
``[{"role": "assistant", "content": text}]`` (the text decoded with the special tokens dropped, so GLM's turn
terminator is not in it); for plain-text data both are strings. ``None`` means "no reward from this function
for this completion" (TRL sums the others).

==============================  ======================================================================
``RuleReward("world_correct")``  ``rewards.rules`` rules; the context comes from the dataset columns:
                                 ``world_prompt`` (a ``pretrain.world.Prompt`` as a dict or its JSON),
                                 ``gold`` (the answer: a number, a word, or a GSM8K ``#### N`` field),
                                 ``lang`` ("en" / "zh"), all optional except what the rule needs
``ScorerReward(scorer)``         a reward model: ``rewards.scoring.RewardScorer`` in-process or
                                 ``rewards.server.RewardClient`` over HTTP (``glmwb serve-rewards``)
``CombinedRewardFunc(combined)`` a ``rewards.rules.CombinedReward`` (rules + RM, its own weights) as one
==============================  ======================================================================

``build_reward_funcs(specs)`` turns the recipe's ``rewards:`` list into (functions, weights); the weights go to
TRL's ``reward_weights`` so that TRL logs every function's mean on its own (``rewards/<name>/mean``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.ranges import AnyFloat, PositiveInt
from glmwb.rewards.rules import RULES, CombinedReward, RuleContext

# Dataset columns the rule rewards read.
WORLD_COLUMN, GOLD_COLUMN, LANG_COLUMN = "world_prompt", "gold", "lang"
MODEL_REWARDS = ("rm", "rm_http")  # a reward folder in-process / a scoring server


class RewardSetupError(ConfigError):
    """A reward that cannot work as configured: unknown name, missing dataset column, unreachable server."""


# ----------------------------------------------------------------------------------------------------------
# What TRL hands over


def completion_text(completion: Any) -> str:
    """The answer text of one TRL completion: a string, or conversational ``[{"role": "assistant", ...}]``.

    GLM's template puts a newline after ``<|assistant|>``, which the model generates; it is stripped."""
    if isinstance(completion, str):
        return completion.strip()
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        parts = [m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant"]
        return "".join(p if isinstance(p, str) else str(p) for p in parts).strip()
    raise TypeError(
        f"a completion must be a string or a list of chat messages, got {type(completion).__name__}"
    )


def prompt_messages(prompt: Any) -> list[dict[str, Any]] | str:
    """A TRL prompt as the scorer takes it: chat messages (conversational) or one user turn (a string)."""
    if isinstance(prompt, str):
        return prompt
    return [dict(m) for m in prompt]


def _world_prompt(value: Any):
    from glmwb.pretrain.world import Prompt

    if isinstance(value, Prompt):
        return value
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise RewardSetupError(
            f"column '{WORLD_COLUMN}' must hold a pretrain.world.Prompt as a dict or JSON, got {type(value).__name__}"
        )
    return Prompt.from_dict(dict(value))


# Which columns each rule cannot do without (one of them).
_NEEDS: dict[str, tuple[str, ...]] = {
    "world_correct": (WORLD_COLUMN,),
    "world_score": (WORLD_COLUMN,),
    "world_on_topic": (WORLD_COLUMN,),
    "gsm8k": (GOLD_COLUMN, WORLD_COLUMN),
    "exact": (GOLD_COLUMN, WORLD_COLUMN),
}


def rule_contexts(
    n: int,
    columns: Mapping[str, Any],
    prompts: Sequence[Any] | None = None,
    length_budget: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> list[RuleContext]:
    """One ``RuleContext`` per completion from TRL's dataset columns (``world_prompt``, ``gold``, ``lang``)."""
    for name in (WORLD_COLUMN, GOLD_COLUMN, LANG_COLUMN):
        if name in columns and len(columns[name]) != n:
            raise RewardSetupError(f"column '{name}' has {len(columns[name])} values for {n} completions")
    out = []
    for i in range(n):
        value = columns[WORLD_COLUMN][i] if columns.get(WORLD_COLUMN) is not None else None
        world = _world_prompt(value) if value is not None else None
        gold = columns[GOLD_COLUMN][i] if GOLD_COLUMN in columns else None
        lang = columns[LANG_COLUMN][i] if LANG_COLUMN in columns else None
        out.append(
            RuleContext(
                prompt=prompts[i] if prompts is not None else None,
                world_prompt=world,
                gold=str(gold) if gold is not None else (world.gold if world else None),
                lang=lang or (world.lang if world else None),
                length_budget=length_budget,
                extra=dict(extra or {}),
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Reward functions


class RuleReward:
    """A rule of ``rewards.rules.RULES`` as a TRL reward function (see the module docstring for the columns).

    ``length_budget``: characters for the ``length`` rule (default: the world's budget, else 4 x gold + 20,
    else 400). ``require_final_answer``: the ``format`` rule also wants a ``#### N`` line."""

    def __init__(
        self, rule: str, length_budget: int | None = None, require_final_answer: bool = False
    ) -> None:
        if rule not in RULES:
            raise RewardSetupError(f"unknown rule {rule!r}; known rules: {', '.join(RULES)}")
        self.rule, self.fn = rule, RULES[rule]
        self.length_budget = length_budget
        self.extra = {"require_final_answer": require_final_answer}
        self.__name__ = rule  # TRL logs rewards/<__name__>/mean

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> list[float | None]:
        needs = _NEEDS.get(self.rule, ())
        if needs and not any(columns.get(c) is not None for c in needs):
            given = sorted(k for k in columns if k not in _TRL_KWARGS)
            raise RewardSetupError(
                f"reward '{self.rule}' needs the dataset column {' or '.join(repr(c) for c in needs)}; "
                f"the data has {given or 'no extra columns'}"
            )
        contexts = rule_contexts(len(completions), columns, prompts, self.length_budget, self.extra)
        out: list[float | None] = []
        for c, ctx in zip(completions, contexts, strict=True):
            have = {WORLD_COLUMN: ctx.world_prompt is not None, GOLD_COLUMN: ctx.gold is not None}
            missing = bool(needs) and not any(have[c] for c in needs)
            # a row without what the rule needs (mixed data): no reward from this function (TRL sums the others)
            out.append(None if missing else self.fn(completion_text(c), ctx))
        return out


_TRL_KWARGS = {"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}


class ScorerReward:
    """A reward model as a TRL reward function: anything with ``score(prompts, responses, head=, normalize=)``
    (``RewardScorer`` in-process, ``RewardClient`` over HTTP).

    ``normalize`` standardises with the reward folder's training mean / std. An empty answer cannot be scored
    (the scorer refuses it), so it gets ``empty_reward`` (default -3: three standard deviations below the mean
    of normalised scores). Requests go in chunks of at most ``batch_size`` items (a server's ``max_batch``)."""

    def __init__(
        self,
        scorer: Any,
        head: str | None = None,
        normalize: bool = True,
        empty_reward: float = -3.0,
        batch_size: int = 256,
        name: str = "reward_model",
    ) -> None:
        if not callable(getattr(scorer, "score", None)):
            raise RewardSetupError(
                f"a reward-model scorer needs a score() method, got {type(scorer).__name__}"
            )
        self.scorer, self.head, self.normalize = scorer, head, normalize
        self.empty_reward, self.batch_size = empty_reward, max(1, batch_size)
        self.__name__ = name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        texts = [completion_text(c) for c in completions]
        keep = [i for i, t in enumerate(texts) if t]
        rewards = [float(self.empty_reward)] * len(texts)
        for start in range(0, len(keep), self.batch_size):
            chunk = keep[start : start + self.batch_size]
            scores = self._score([prompt_messages(prompts[i]) for i in chunk], [texts[i] for i in chunk])
            for i, s in zip(chunk, scores, strict=True):
                rewards[i] = float(s)
        return rewards

    def _score(self, prompts: list[Any], responses: list[str]) -> list[float]:
        kwargs = {"normalize": True} if self.normalize else {}
        if self.head is not None:
            kwargs["head"] = self.head
        try:
            return self.scorer.score(prompts, responses, **kwargs)
        except Exception as e:  # a server that went away mid-run: say which one
            url = getattr(self.scorer, "url", None)
            if url is not None and _is_connection_error(e):
                raise RewardSetupError(f"reward server {url} stopped answering: {e}") from e
            raise


class CombinedRewardFunc:
    """A ``rewards.rules.CombinedReward`` (weighted rules + RM in one number) as a TRL reward function."""

    def __init__(
        self, combined: CombinedReward, length_budget: int | None = None, name: str = "combined"
    ) -> None:
        self.combined, self.length_budget = combined, length_budget
        self.__name__ = name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        contexts = rule_contexts(len(completions), columns, prompts, self.length_budget)
        return self.combined(
            [prompt_messages(p) for p in prompts], [completion_text(c) or " " for c in completions], contexts
        )


def _is_connection_error(e: BaseException) -> bool:
    import httpx

    return isinstance(e, (httpx.TransportError, ConnectionError, OSError))


def connect_reward_server(url: str, timeout: float = 60.0) -> tuple[Any, dict[str, Any]]:
    """A ``RewardClient`` for ``url`` and its ``/health`` answer; ``RewardSetupError`` when nobody answers."""
    from glmwb.rewards.server import RewardClient

    client = RewardClient(url, timeout=timeout)
    try:
        health = client.health()
    except Exception as e:
        if _is_connection_error(e) or isinstance(e, ValueError):
            raise RewardSetupError(
                f"reward server {url} is unreachable ({type(e).__name__}: {e}); start one with "
                "`glmwb serve-rewards REWARD_FOLDER --port PORT` or fix the url"
            ) from None
        raise
    if health.get("status") != "ok":
        raise RewardSetupError(f"reward server {url} is not healthy: {health}")
    return client, health


# ----------------------------------------------------------------------------------------------------------
# From the recipe


@dataclass(frozen=True)
class RewardSpec:
    """One entry of a recipe's ``rewards:`` list.

    ``name``: a rule (world_correct, world_score, world_on_topic, gsm8k, exact, format, length), ``rm`` (a reward folder,
    scored in-process) or ``rm_http`` (a ``glmwb serve-rewards`` server)."""

    name: str
    weight: AnyFloat = 1.0
    folder: str | None = None  # rm: the reward folder
    url: str | None = None  # rm_http: e.g. http://127.0.0.1:8008
    head: str | None = None  # rm / rm_http: which head (default: the first)
    normalize: bool = True  # rm / rm_http: standardise with the folder's training mean / std
    empty_reward: AnyFloat = -3.0  # rm / rm_http: reward of an empty answer (it cannot be scored)
    device: str | None = None  # rm: where the reward model runs (default: cuda when there is one)
    length_budget: PositiveInt | None = None  # length: characters (default: the world's budget)
    require_final_answer: bool = False  # format: a '#### N' final line is required

    def __post_init__(self) -> None:
        if self.name not in RULES and self.name not in MODEL_REWARDS:
            raise ValueError(
                f"unknown reward {self.name!r}; rules: {', '.join(RULES)}; models: {', '.join(MODEL_REWARDS)}"
            )
        if self.name == "rm" and not self.folder:
            raise ValueError("reward 'rm' needs folder: a reward-model folder (rewards stage's final/)")
        if self.name == "rm_http" and not self.url:
            raise ValueError(
                "reward 'rm_http' needs url: a `glmwb serve-rewards` address, e.g. http://127.0.0.1:8008"
            )
        if self.name not in MODEL_REWARDS and (self.folder or self.url):
            raise ValueError(f"reward {self.name!r} is a rule: folder / url are for 'rm' / 'rm_http'")


def build_reward_funcs(specs: Sequence[RewardSpec]) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """(TRL reward functions, their weights) for the recipe's ``rewards:`` list; every model loaded and every
    server contacted here, so mistakes surface before training starts."""
    from pathlib import Path

    if not specs:
        raise RewardSetupError("rewards: the list is empty; name at least one reward (e.g. world_correct)")
    names = [s.name if s.name not in MODEL_REWARDS else f"{s.name}:{s.folder or s.url}" for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RewardSetupError(f"rewards: listed twice: {', '.join(dupes)}")
    funcs: list[Callable[..., list[float]]] = []
    for i, s in enumerate(specs):
        if s.name == "rm":
            from glmwb.rewards.scoring import RewardScorer

            if not (Path(s.folder) / "reward_config.json").is_file():
                raise RewardSetupError(
                    f"rewards[{i}].folder: no reward folder at {s.folder!r} (expected reward_config.json there)"
                )
            scorer = RewardScorer.from_pretrained(s.folder, device=s.device)
            if s.head is not None and s.head not in scorer.heads:
                raise RewardSetupError(f"rewards[{i}].head: {s.head!r} is not one of {scorer.heads}")
            funcs.append(ScorerReward(scorer, s.head, s.normalize, s.empty_reward, name="rm"))
        elif s.name == "rm_http":
            client, health = connect_reward_server(s.url)
            if s.head is not None and s.head not in health.get("heads", []):
                raise RewardSetupError(f"rewards[{i}].head: {s.head!r} is not one of {health.get('heads')}")
            batch = int(health.get("max_batch") or 256)
            funcs.append(ScorerReward(client, s.head, s.normalize, s.empty_reward, batch, name="rm_http"))
        else:
            funcs.append(RuleReward(s.name, s.length_budget, s.require_final_answer))
    return funcs, [s.weight for s in specs]
