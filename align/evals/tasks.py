"""The evaluation tasks: each turns a data file (or the embedded world, or a generator) into chat prompts,
and grades one answer per prompt.

    task.load() -> [Item(id, messages, ref)]        the prompts, in a fixed order, ids stable across runs
    task.score(items, {id: answer}) -> {id: {correct, ...}}   per-item results (every value a number)
    task.aggregate(rows) -> {metric: value}           the task's scores from the per-item results

| task | data | graded by |
|---|---|---|
| ``gsm8k`` | GSM8K JSONL ``{question, answer}`` | lm-eval (``exact_match``, strict ``#### N`` and flexible) |
| ``ifeval`` | IFEval ``input_data.jsonl`` | lm-eval's IFEval checkers (strict / loose, prompt / instruction) |
| ``mc`` | ``{question, choices, answer}`` or C-Eval ``{question, A.., answer}`` JSONL | lm-eval (first letter) |
| ``humaneval`` | ``HumanEval.jsonl(.gz)`` | the unit tests run in our sandbox (``sandbox.py``) |
| ``world`` | the embedded world | the world's checker |
| ``needle`` | generated haystacks | the hidden number in the answer |
| ``winrate`` | ``{prompt}`` JSONL | a reward model (per-item reward; win rates in the comparison) |
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmwb.align.evals import lmeval, sandbox
from glmwb.pretrain.errors import ConfigError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Item:
    id: str
    messages: tuple[dict[str, str], ...]
    ref: dict[str, Any] = field(default_factory=dict, compare=False)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no data file at {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from None
    if not rows:
        raise ConfigError(f"{path}: no records")
    return rows


def _need(row: dict[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}; has {', '.join(sorted(row))}")


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


class Task:
    """The shared shape; a subclass sets ``name`` and ``engine`` and defines load / score."""

    name = "task"
    engine = "glmwb"
    max_new_tokens = 256
    needs_reward_model = False

    def __init__(self, path: str | Path | None = None, limit: int | None = None, shots: int = 0) -> None:
        self.path, self.limit, self.shots = path, limit, shots

    def load(self) -> list[Item]:
        raise NotImplementedError

    def score(self, items: Sequence[Item], predictions: dict[str, str]) -> dict[str, dict[str, float]]:
        raise NotImplementedError

    def aggregate(self, rows: Sequence[dict[str, float]]) -> dict[str, float]:
        """The mean of every per-item value (``correct`` is the task's headline accuracy)."""
        keys = [k for k in rows[0] if all(k in r for r in rows)] if rows else []
        return {k: _mean([r[k] for r in rows]) for k in keys}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "data": str(self.path) if self.path else None, "limit": self.limit,
                "shots": self.shots, "engine": self.engine}  # fmt: skip

    def _rows(self) -> list[dict[str, Any]]:
        if self.path is None:
            raise ConfigError(f"task {self.name}: give its data file (--data {self.name}=PATH)")
        rows = read_jsonl(self.path)
        return rows[: self.limit] if self.limit else rows


# -- GSM8K -----------------------------------------------------------------------------------------------

GSM8K_INSTRUCTION = (
    "Solve the problem step by step. End with the final answer on its own line as '#### <number>'."
)


def gsm8k_messages(question: str, shots: Sequence[dict[str, Any]] = ()) -> Messages:
    """The chat prompt: ``shots`` solved examples as earlier turns, then the question."""
    out: Messages = []
    for s in shots:
        out += [{"role": "user", "content": f"{s['question']}\n{GSM8K_INSTRUCTION}"},
                {"role": "assistant", "content": s["answer"]}]  # fmt: skip
    return out + [{"role": "user", "content": f"{question}\n{GSM8K_INSTRUCTION}"}]


class GSM8K(Task):
    name, engine, max_new_tokens = "gsm8k", "lm-eval", 320

    def __init__(self, path=None, limit=None, shots: int = 0, shots_path: str | Path | None = None) -> None:
        super().__init__(path, limit, shots)
        # solved examples from the training split beside the test file (GSM8K's own few-shot source)
        self.shots_path = shots_path or (Path(path).with_name("train.jsonl") if path else None)

    def load(self) -> list[Item]:
        shots = read_jsonl(self.shots_path)[: self.shots] if self.shots else []
        items = []
        for i, row in enumerate(self._rows()):
            _need(row, ["question", "answer"], f"{self.path} record {i + 1}")
            items.append(Item(str(i), tuple(gsm8k_messages(row["question"], shots)), row))
        return items

    def score(self, items, predictions):
        docs = [
            {lmeval.ID: it.id, "question": it.ref["question"], "answer": it.ref["answer"]} for it in items
        ]
        _, per_item = lmeval.score_with_lmeval(lmeval.GSM8K, docs, predictions)
        return {
            i: {"correct": r["exact_match,strict-match"], "flexible": r["exact_match,flexible-extract"]}
            for i, r in per_item.items()
        }


_ARITHMETIC = (
    ("{a} has {x} apples and buys {y} more. How many apples does {a} have now?", "{x} + {y} = {r}", "+"),
    ("{a} had {x} coins and gave {y} away. How many coins does {a} have left?", "{x} - {y} = {r}", "-"),
    ("{a} packs {x} boxes with {y} pens each. How many pens is that?", "{x} * {y} = {r}", "*"),
)


class Arithmetic(GSM8K):
    """A generated slice of GSM8K-style one-step word problems (small numbers), graded like GSM8K."""

    name = "arithmetic"

    def __init__(self, limit: int | None = 40, seed: int = 0) -> None:
        super().__init__(None, limit)
        self.seed = seed

    def load(self) -> list[Item]:
        rng = random.Random(self.seed)
        items = []
        for i in range(self.limit or 40):
            question, working, op = _ARITHMETIC[i % len(_ARITHMETIC)]
            x, y = rng.randint(2, 12), rng.randint(1, 9)
            x = x + y if op == "-" else x
            r = {"+": x + y, "-": x - y, "*": x * y}[op]
            a = rng.choice(["Mia", "Leo", "Ana", "Tom"])
            row = {
                "question": question.format(a=a, x=x, y=y),
                "answer": working.format(x=x, y=y, r=r) + f"\n#### {r}",
            }
            items.append(Item(str(i), tuple(gsm8k_messages(row["question"])), row))
        return items

    def describe(self):
        return {**super().describe(), "seed": self.seed}


# -- IFEval ----------------------------------------------------------------------------------------------


class IFEval(Task):
    name, engine, max_new_tokens = "ifeval", "lm-eval", 512

    def load(self) -> list[Item]:
        items = []
        for i, row in enumerate(self._rows()):
            _need(row, ["key", "prompt", "instruction_id_list", "kwargs"], f"{self.path} record {i + 1}")
            items.append(Item(str(row["key"]), ({"role": "user", "content": row["prompt"]},), row))
        return items

    def score(self, items, predictions):
        docs = [{lmeval.ID: it.id, **{k: it.ref[k] for k in ("key", "prompt", "instruction_id_list", "kwargs")}}
                for it in items]  # fmt: skip
        _, per_item = lmeval.score_with_lmeval(lmeval.ifeval_config(), docs, predictions)
        out = {}
        for i, r in per_item.items():
            n = len(next(it for it in items if it.id == i).ref["instruction_id_list"])
            out[i] = {"correct": r["prompt_level_strict_acc,none"], "loose": r["prompt_level_loose_acc,none"],
                      "instructions": float(n), "followed": r["inst_level_strict_acc,none"] * n,
                      "followed_loose": r["inst_level_loose_acc,none"] * n}  # fmt: skip
        return out

    def aggregate(self, rows):
        n = sum(r["instructions"] for r in rows)
        return {"correct": _mean([r["correct"] for r in rows]), "loose": _mean([r["loose"] for r in rows]),
                "instruction_strict": sum(r["followed"] for r in rows) / n,
                "instruction_loose": sum(r["followed_loose"] for r in rows) / n}  # fmt: skip

    def describe(self):
        return {**super().describe(), "sentence_model": lmeval.offline_nltk()}


# -- multiple choice (MMLU, C-Eval, CMMLU shapes) ---------------------------------------------------------

LETTERS = "ABCDEFGHIJ"


def mc_fields(row: dict[str, Any], where: str) -> tuple[str, list[str], str]:
    """(question, choices, gold letter) from ``{question, choices, answer: letter | index}`` or C-Eval /
    CMMLU's ``{question, A, B, C, D, answer: letter}``."""
    _need(row, ["question", "answer"], where)
    choices = row.get("choices") or [row[c] for c in LETTERS if c in row]
    if len(choices) < 2:
        raise ConfigError(f"{where}: needs 'choices' (a list) or option fields A, B, ...")
    ans = row["answer"]
    gold = LETTERS[ans] if isinstance(ans, int) else str(ans).strip().upper()
    if gold not in LETTERS[: len(choices)]:
        raise ConfigError(f"{where}: answer {ans!r} is not one of the {len(choices)} options")
    return row["question"], [str(c) for c in choices], gold


class MultipleChoice(Task):
    name, engine, max_new_tokens = "mc", "lm-eval", 16

    def load(self) -> list[Item]:
        items = []
        for i, row in enumerate(self._rows()):
            q, choices, gold = mc_fields(row, f"{self.path} record {i + 1}")
            options = "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(choices))
            text = f"{q}\n{options}\nAnswer with the letter of the right option."
            items.append(Item(str(row.get("id", i)), ({"role": "user", "content": text},), {"gold": gold}))
        return items

    def score(self, items, predictions):
        docs = [{lmeval.ID: it.id, "question": it.messages[-1]["content"], "gold_letter": it.ref["gold"]}
                for it in items]  # fmt: skip
        _, per_item = lmeval.score_with_lmeval(lmeval.MULTIPLE_CHOICE, docs, predictions)
        return {i: {"correct": r["exact_match,first-letter"]} for i, r in per_item.items()}


# -- HumanEval ---------------------------------------------------------------------------------------------

CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    """The program to run: the problem's prompt and the answer, its tests, ``check(entry_point)``.

    A chat model answers with the whole function (in a code block or not): it follows the prompt, whose
    imports and helpers it keeps, and redefines the function. A base model continues the prompt: its text
    is the function's body."""
    m = CODE_BLOCK.search(completion)
    code = m.group(1) if m else completion
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        body = problem["prompt"] + "\n    pass\n\n" + code
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


class HumanEval(Task):
    name, engine, max_new_tokens = "humaneval", "glmwb sandbox", 512

    def __init__(self, path=None, limit=None, shots: int = 0, workers: int = 2,
                 limits: sandbox.Limits | None = None) -> None:  # fmt: skip
        super().__init__(path, limit, shots)
        self.workers, self.limits = workers, limits or sandbox.Limits()

    def load(self) -> list[Item]:
        items = []
        for i, row in enumerate(self._rows()):
            _need(row, ["task_id", "prompt", "entry_point", "test"], f"{self.path} record {i + 1}")
            text = ("Complete the following Python function. Answer with the whole function in one "
                    f"```python code block.\n\n```python\n{row['prompt']}```")  # fmt: skip
            items.append(Item(row["task_id"], ({"role": "user", "content": text},), row))
        return items

    def score(self, items, predictions):
        def run(it: Item) -> tuple[str, sandbox.SandboxResult]:
            return it.id, sandbox.run_python(humaneval_program(it.ref, predictions[it.id]), self.limits)

        with ThreadPoolExecutor(self.workers) as pool:
            done = dict(pool.map(run, items))
        return {
            i: {"correct": float(r.passed), "timeout": float(r.status == "timeout")} for i, r in done.items()
        }

    def describe(self):
        return {**super().describe(), "sandbox": sandbox.isolation(), "sandbox_python": sandbox.interpreter(),
                "limits": vars(self.limits)}  # fmt: skip


# -- the embedded world -------------------------------------------------------------------------------------


class World(Task):
    name, engine, max_new_tokens = "world", "glmwb world checker", 48

    def __init__(self, limit: int | None = 200, split: str = "heldout", seed: int = 0, world_seed: int = 0,
                 num_entities: int | None = None) -> None:  # fmt: skip
        super().__init__(None, limit)
        self.split, self.seed, self.world_seed, self.num_entities = split, seed, world_seed, num_entities
        self._world = None

    @property
    def world(self):
        if self._world is None:
            from glmwb.pretrain.world import make_world

            kw = {} if self.num_entities is None else {"num_entities": self.num_entities}
            self._world = make_world(seed=self.world_seed, **kw)
        return self._world

    def load(self) -> list[Item]:
        prompts = self.world.prompts(self.split, self.limit or 200, seed=self.seed)
        return [Item(p.id, tuple(p.messages), {"prompt": p}) for p in prompts]

    def score(self, items, predictions):
        out = {}
        for it in items:
            c = self.world.check(it.ref["prompt"], predictions[it.id])
            out[it.id] = {"correct": float(c.correct), "right_language": float(c.right_language),
                          "score": float(c.score)}  # fmt: skip
        return out

    def describe(self):
        return {**super().describe(), "split": self.split, "seed": self.seed, "world_seed": self.world_seed,
                "num_entities": self.num_entities}  # fmt: skip


# -- needle in a haystack --------------------------------------------------------------------------------

_FILLER_WORDS = (
    "the river runs past the old mill and the baker opens her shop before the market fills with carts "
    "of apples while a grey cat sleeps on the warm stones near the bridge and two boys count the boats"
).split()


def haystack(words: int, depth: float, needle: str, rng: random.Random) -> str:
    """``words`` filler words in sentences, with the ``needle`` sentence at ``depth`` (0 = start, 1 = end)."""
    sentences, n = [], 0
    while n < words:
        k = rng.randint(8, 16)
        sentences.append(" ".join(rng.choice(_FILLER_WORDS) for _ in range(k)).capitalize() + ".")
        n += k
    sentences.insert(round(depth * len(sentences)), needle)
    return " ".join(sentences)


class Needle(Task):
    """Retrieval of a five-digit number hidden in filler text, by context length (words) and depth."""

    name, engine, max_new_tokens = "needle", "glmwb", 16

    def __init__(self, lengths: Sequence[int] = (64, 256, 1024), depths: Sequence[float] = (0.0, 0.5, 1.0),
                 per_cell: int = 4, seed: int = 0) -> None:  # fmt: skip
        super().__init__(None, None)
        self.lengths, self.depths, self.per_cell, self.seed = tuple(lengths), tuple(depths), per_cell, seed

    def load(self) -> list[Item]:
        rng = random.Random(self.seed)
        items = []
        for length in self.lengths:
            for depth in self.depths:
                for k in range(self.per_cell):
                    code = str(rng.randint(10000, 99999))
                    text = haystack(length, depth, f"The secret number is {code}.", rng)
                    question = (
                        f"{text}\n\nWhat is the secret number in the text above? Answer with the number."
                    )
                    items.append(Item(f"L{length}/d{depth:g}/{k}", ({"role": "user", "content": question},),
                                      {"code": code, "length": length, "depth": depth}))  # fmt: skip
        return items

    def score(self, items, predictions):
        return {it.id: {"correct": float(it.ref["code"] in re.sub(r"[\s,]", "", predictions[it.id]))}
                for it in items}  # fmt: skip

    def grid(self, rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """{length: {depth: accuracy}} from per-item results keyed by item id."""
        cells: dict[tuple[str, str], list[float]] = {}
        for i, r in rows.items():
            length, depth, _ = i.split("/")
            cells.setdefault((length[1:], depth[1:]), []).append(r["correct"])
        out: dict[str, dict[str, float]] = {}
        for (length, depth), xs in cells.items():
            out.setdefault(length, {})[depth] = _mean(xs)
        return out

    def describe(self):
        return {**super().describe(), "lengths_words": list(self.lengths), "depths": list(self.depths),
                "per_cell": self.per_cell, "seed": self.seed}  # fmt: skip


# -- pairwise win rate by a reward model --------------------------------------------------------------------


class WinRate(Task):
    """Prompts whose answers a reward model scores; comparing two checkpoints gives the win rate."""

    name, engine, max_new_tokens = "winrate", "glmwb reward model", 128
    needs_reward_model = True

    def load(self) -> list[Item]:
        items = []
        for i, row in enumerate(self._rows()):
            if "messages" in row:
                msgs = tuple(row["messages"])
            else:
                _need(row, ["prompt"], f"{self.path} record {i + 1}")
                msgs = ({"role": "user", "content": row["prompt"]},)
            items.append(Item(str(row.get("id", i)), msgs))
        return items

    def score(self, items, predictions):
        return {it.id: {} for it in items}  # the reward is added by the harness


TASKS: dict[str, type[Task]] = {
    t.name: t for t in (GSM8K, Arithmetic, IFEval, MultipleChoice, HumanEval, World, Needle, WinRate)
}


def make_task(
    name: str, path: str | None = None, limit: int | None = None, shots: int = 0, **kw: Any
) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    cls = TASKS[name]
    if cls in (World, Needle, Arithmetic):
        return cls(**({"limit": limit} if cls is not Needle and limit else {}), **kw)
    return cls(path, limit, shots, **kw)
