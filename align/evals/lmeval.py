"""Scoring through EleutherAI's lm-evaluation-harness (``lm-eval``), offline, on outputs we already have.

lm-eval scores GSM8K (its regex filters and ``exact_match``), IFEval (its copy of Google's instruction
checkers) and generative multiple choice here. It does not generate: its ``LM`` is a :class:`Replay` that
hands back the answers already in hand (from a model run here, or a predictions file), so the same scoring
code serves both modes and the answers can be cached per item.

Its tasks read the local JSONL files (``dataset_path: json``), never a hub: ``HF_DATASETS_OFFLINE`` and
``HF_HUB_OFFLINE`` are set before it is imported. Two gaps are closed without forking it:

- IFEval's checker downloads NLTK's ``punkt_tab`` sentence model at import. ``offline_nltk`` makes that a
  no-op: an installed ``punkt_tab`` is used when NLTK finds one; otherwise an *untrained* Punkt model
  with a list of common English abbreviations is written to the cache folder (sentence counts can then
  differ from the published scorer's on text with unusual abbreviations; the record says which was used).
  ``nltk.download`` is replaced by a refusal.
- HumanEval's lm-eval task loads HF ``evaluate``'s ``code_eval`` metric from the hub and runs the code in
  a bare subprocess; HumanEval is scored by our sandbox instead (``sandbox.py``).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ID = "glmwb_id"  # the field of each document that names its item

# Common English abbreviations (lower case, no final period) for the untrained Punkt model: a period after
# one of these does not end a sentence.
_ABBREVIATIONS = (
    "mr mrs ms dr prof sr jr st vs etc e.g i.e inc ltd co corp dept univ fig approx no vol jan feb mar apr "
    "jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun u.s u.k a.m p.m ph.d"
).split()


def require_lmeval() -> None:
    """One line instead of a traceback when the ``eval`` extra is not installed."""
    from importlib.util import find_spec

    if find_spec("lm_eval") is None:
        from glmwb.pretrain.errors import ConfigError

        raise ConfigError("this task is scored by lm-eval, which is not installed: pip install -e '.[eval]'")


@functools.lru_cache(maxsize=1)
def offline_nltk() -> str:
    """Make IFEval's checker importable without a download; returns which sentence model it uses."""
    import nltk

    def refuse(*args: Any, **kwargs: Any) -> bool:
        return False  # never fetch NLTK data during an evaluation

    nltk.download = refuse
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return "punkt_tab (installed NLTK data)"
    except LookupError:
        pass
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glmwb" / "nltk_data"
    english = root / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
        (english / name).write_text("")
    (english / "abbrev_types.txt").write_text("\n".join(_ABBREVIATIONS) + "\n")
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return "untrained Punkt with glmwb's abbreviation list (no punkt_tab installed)"


def _replay_class():
    from lm_eval.api.model import LM

    class Replay(LM):
        """An lm-eval model that answers each document with the prediction already made for it."""

        def __init__(self, predictions: dict[str, str]) -> None:
            super().__init__()
            self.predictions = predictions

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return [self.predictions[str(r.doc[ID])] for r in requests]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("Replay scores generated answers only")

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("Replay scores generated answers only")

    return Replay


def score_with_lmeval(
    config: dict[str, Any], docs: Sequence[dict[str, Any]], predictions: dict[str, str]
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Score ``predictions`` ({item id: text}) of the documents ``docs`` (each with the field ``glmwb_id``)
    with the lm-eval task ``config`` (a task config dict without its dataset). Returns (lm-eval's aggregate
    results, {item id: {"metric,filter": value}})."""
    require_lmeval()
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.evaluator import evaluate

    with tempfile.TemporaryDirectory(prefix="glmwb-lmeval-") as folder:
        data = Path(folder) / "docs.jsonl"
        with data.open("w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        task_config = {
            **config,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "keep_in_memory": True},
            "test_split": "test",
            "output_type": "generate_until",
            "num_fewshot": 0,
        }
        task = ConfigurableTask(config=task_config)
        name = task_config["task"]
        out = evaluate(
            _replay_class()(predictions), {name: task}, log_samples=True, bootstrap_iters=0, verbosity="ERROR"
        )
    per_item: dict[str, dict[str, float]] = {}
    for s in out["samples"][name]:
        row = per_item.setdefault(str(s["doc"][ID]), {})
        for metric in s["metrics"]:
            value = s[metric]
            row[f"{metric},{s['filter']}"] = (
                _mean_bool(value) if isinstance(value, (list, tuple)) else float(value)
            )
    results = {k: v for k, v in out["results"][name].items() if "," in k and "stderr" not in k}
    return {k: float(v) for k, v in results.items()}, per_item


def _mean_bool(values: Sequence[Any]) -> float:
    return float(sum(bool(v) for v in values) / len(values)) if values else float("nan")


# -- task configs (the published ones' scoring, our data and no generation settings: we generate) -----------

GSM8K = {
    "task": "glmwb_gsm8k",
    "doc_to_text": "{{question}}",
    "doc_to_target": "{{answer}}",
    "metric_list": [
        {
            "metric": "exact_match",
            "aggregation": "mean",
            "higher_is_better": True,
            "ignore_case": True,
            "ignore_punctuation": False,
            "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
        }
    ],
    "generation_kwargs": {"until": [], "do_sample": False},
    "filter_list": [
        {
            "name": "strict-match",
            "filter": [
                {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                {"function": "take_first"},
            ],
        },
        {
            "name": "flexible-extract",
            "filter": [
                {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                {"function": "take_first"},
            ],
        },
    ],
    "metadata": {"version": 3.0},
}


def ifeval_config() -> dict[str, Any]:
    require_lmeval()
    offline_nltk()
    from lm_eval.tasks.ifeval import utils

    return {
        "task": "glmwb_ifeval",
        "doc_to_text": "prompt",
        "doc_to_target": 0,
        "generation_kwargs": {"until": [], "do_sample": False},
        "process_results": utils.process_results,
        "metric_list": [
            {"metric": "prompt_level_strict_acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "inst_level_strict_acc", "aggregation": utils.agg_inst_level_acc, "higher_is_better": True},
            {"metric": "prompt_level_loose_acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "inst_level_loose_acc", "aggregation": utils.agg_inst_level_acc, "higher_is_better": True},
        ],
        "metadata": {"version": 4.0},
    }  # fmt: skip


# Generative multiple choice (MMLU, C-Eval, CMMLU): the first standalone option letter of the answer.
MULTIPLE_CHOICE = {
    "task": "glmwb_multiple_choice",
    "doc_to_text": "{{question}}",
    "doc_to_target": "{{gold_letter}}",
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    "generation_kwargs": {"until": [], "do_sample": False},
    "filter_list": [
        {
            "name": "first-letter",
            "filter": [
                {"function": "regex", "regex_pattern": "(?<![A-Za-z])([A-J])(?![A-Za-z])"},
                {"function": "take_first"},
            ],
        }
    ],
    "metadata": {"version": 1.0},
}

# which per-item value is an item's "correct" (0/1), per task config
PRIMARY: dict[str, str] = {
    "glmwb_gsm8k": "exact_match,strict-match",
    "glmwb_ifeval": "prompt_level_strict_acc,none",
    "glmwb_multiple_choice": "exact_match,first-letter",
}

ConfigFactory = Callable[[], dict[str, Any]]
