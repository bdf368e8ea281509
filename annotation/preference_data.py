"""Reading preference files into ``PreferenceRecord``s: the one loader every stage uses (reward models, the
DPO family, the store's import).

Readers (``read_preferences``; every error names the file, the 1-based row and the field):

- ``preference``: JSONL / JSON / ``datasets`` rows with ``prompt`` / ``chosen`` / ``rejected`` (TRL's format,
  strings or chat messages; the store's export, which is ``PreferenceRecord.to_dict()`` per line; and TRL's
  implicit-prompt form, where chosen / rejected are whole conversations sharing the prompt);
- ``hh_rlhf``: Anthropic HH-RLHF, ``{chosen, rejected}`` transcripts ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``,
  split into chat messages; the prompt is the turns both transcripts share, the responses the final
  assistant turns;
- ``oasst_zh``: OASST1-zh pairs ``{prompt, history: [[user, assistant], ...], chosen, rejected, chosen_rank,
  rejected_rank}``; the rank gap becomes the record's margin.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from glmwb.annotation.records import PreferenceDataError, PreferenceRecord, records_from_dicts
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.ranges import Fraction, NonNegInt, PositiveInt, Range

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class AnnotatorsConfig:
    """Simulated annotators labelling the embedded world's pairs (``preference_pairs``)."""

    n: PositiveInt = 3
    noise: Fraction = 0.1  # P(a label is replaced by a uniformly random one), for every annotator...
    noise_per_annotator: tuple[
        Fraction, ...
    ] = ()  # ...or one value per annotator (reliable and careless ones)
    labels_per_pair: PositiveInt = 1  # annotators labelling each pair (>= 2 lets reliability be estimated)
    # they also say how much better the winner is (negligible / slight / clear / strong, from the utility
    # gap); the records' margin is then that level's (annotation.records.STRENGTH_MARGINS), for loss.use_margin
    strength: bool = False

    def __post_init__(self) -> None:
        if self.noise_per_annotator and len(self.noise_per_annotator) != self.n:
            raise ValueError(
                f"noise_per_annotator has {len(self.noise_per_annotator)} values for n={self.n} annotators"
            )
        if not 1 <= self.labels_per_pair <= self.n:
            raise ValueError(f"labels_per_pair must be in [1, n={self.n}], got {self.labels_per_pair}")


@dataclass(frozen=True)
class WorldPairsConfig:
    """``source: world``: pairs of the embedded world's candidate answers, labelled by simulated annotators.
    Settings here apply to the world only; a stage on files never reads them."""

    seed: NonNegInt = 0
    num_entities: PositiveInt = 96
    annotators: AnnotatorsConfig = field(default_factory=AnnotatorsConfig)
    train_prompts: PositiveInt = 2000  # one pair per prompt (labels_per_pair labels each)
    heldout_prompts: NonNegInt = 400  # held-out prompts (instances never asked in training)
    # also this many training prompts from the `dev` half of the held-out instances, the prompts PPO samples
    # on (recipes/ppo.yaml prompts.world.train_split): annotators label answers on the distribution RL will
    # run on, as in any RLHF loop. The evaluation then uses only the other half (heldout_split: test).
    dev_prompts: NonNegInt = 0
    # the dev prompts' phrasings: null = dev's own three; 4 also asks them the fourth way, as PPO's
    # prompts.world.train_phrasings: 4 does (192 dev instances x 2 languages x 4 phrasings = 1,536 prompts)
    dev_phrasings: Annotated[int, Range(1, 4)] | None = None
    heldout_split: Literal["heldout", "test"] = "heldout"  # the instances the held-out pairs come from
    # the share of training prompts whose pair is a minimal pair (one answer sentence with a wrong value or
    # wrapped in filler, World.contrast_responses); held-out pairs are always drawn as before
    contrastive: Fraction = 0.0
    # which minimal pairs, drawn uniformly ('a>b', a and b from correct / wrong / verbose / wrong_language and
    # the counterfactual verbose_wrong / wrong_language_wrong / terse / terse_wrong / other_subject /
    # other_attribute / terse_other; 'all': every pairing of those eleven; repeat one to weight it; the
    # annotators give the label)
    contrast_kinds: tuple[str, ...] = ("correct>wrong", "correct>wrong", "correct>verbose")

    def __post_init__(self) -> None:
        if not 0.0 <= self.contrastive <= 1.0:
            raise ValueError(f"data.world.contrastive must be a fraction in [0, 1], got {self.contrastive}")
        if self.dev_prompts < 0:
            raise ValueError(f"data.world.dev_prompts must be >= 0, got {self.dev_prompts}")
        if self.dev_phrasings is not None and not 1 <= self.dev_phrasings <= 4:
            raise ValueError(f"data.world.dev_phrasings must be 1 to 4 or null, got {self.dev_phrasings}")
        if self.dev_prompts and self.heldout_split != "test":
            raise ValueError(
                f"data.world.dev_prompts ({self.dev_prompts}) trains on the world's dev instances, which are half "
                "of heldout_split 'heldout': set data.world.heldout_split: test (the other half) to keep the "
                "evaluation held out"
            )
        if self.contrastive:
            from glmwb.annotation.annotators import contrast_pairs  # names the allowed kinds in its error

            if not self.contrast_kinds:
                raise ValueError(
                    "data.world.contrast_kinds is empty; name at least one minimal pair such as 'correct>wrong'"
                )
            contrast_pairs(self.contrast_kinds)


@dataclass(frozen=True)
class PreferenceDataConfig:
    """Preference pairs for every stage that learns from them (reward models, the DPO family): the embedded
    world's simulated annotators (``world``), or files, plus ``extra_paths`` either way."""

    source: Literal["world", "files"] = "world"
    tokenizer: str | None = None  # a tokenizer folder; default: the one in model.init_from
    world: WorldPairsConfig = field(default_factory=WorldPairsConfig)
    paths: tuple[str, ...] = ()  # files: training data (JSONL / JSON / .gz / parquet / datasets folder)
    eval_paths: tuple[str, ...] = ()  # files: held-out data; default: eval_fraction of paths
    extra_paths: tuple[
        str, ...
    ] = ()  # more training pairs, whatever the source (a preferences stage's export)
    format: Literal["auto", "preference", "hh_rlhf", "oasst_zh"] = "auto"
    skip_invalid: bool = False  # leave out (and count) malformed rows instead of stopping at the first
    eval_fraction: Annotated[float, Range(0, 1, hi_open=True)] = 0.05
    max_train_pairs: PositiveInt | None = None
    max_eval_pairs: PositiveInt | None = None
    max_length: PositiveInt = 256  # tokens of prompt + response + terminator
    # too long: "left" keeps [gMASK]<sop> and the newest tokens, "drop" leaves the pair out, "error" stops
    truncation: Literal["left", "drop", "error"] = "left"
    # training pairs an annotator marked "both bad" (provenance.label: the store's export and the world's
    # annotators): a tie (the loss's tie term pulls the two rewards together) or left out (docs/rewards.md)
    both_bad: Literal["tie", "drop"] = "tie"
    # with both_bad: tie, the weight of those tie pairs in the loss (x the record's own): < 1 lets two wrong
    # answers of different forms keep apart (a wrong sentence above a refusal) while still learning ties
    both_bad_weight: Annotated[float, Range(0, 1, lo_open=True)] = 1.0

    def __post_init__(self) -> None:
        if self.source == "files" and not self.paths:
            raise ValueError("data.source is 'files' but data.paths is empty; list preference files")
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8, got {self.max_length}")
        if not 0.0 < self.both_bad_weight <= 1.0:
            raise ValueError(
                f"data.both_bad_weight must be in (0, 1] (the weight of 'both bad' tie pairs; "
                f"data.both_bad: drop leaves them out), got {self.both_bad_weight}"
            )


# ----------------------------------------------------------------------------------------------------------
# Reading files


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of a JSONL / JSON array file (``.gz`` allowed), a ``.parquet`` file or a
    ``datasets`` folder (``save_to_disk``); ``where`` is "FILE, row N" (1-based). A JSONL line that is not
    JSON comes as a ``PreferenceDataError`` in place of the row."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"preference data not found: {path}")
    if path.is_dir() or path.suffix == ".parquet":
        import datasets

        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_parquet(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise PreferenceDataError(f"{path}: a DatasetDict ({', '.join(ds)}); name one split's folder")
        for i, row in enumerate(ds, 1):
            yield f"{path}, row {i}", row
        return
    try:
        yield from _text_rows(path)
    except (OSError, EOFError, UnicodeDecodeError) as e:  # a corrupt .gz, bytes that are not UTF-8, ...
        what = (
            f"not UTF-8 text ({e.reason} at byte {e.start})" if isinstance(e, UnicodeDecodeError) else str(e)
        )
        raise PreferenceDataError(f"{path}: cannot be read: {what}") from None


def _text_rows(path: Path) -> Iterator[tuple[str, Any]]:
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    with _open_text(path) as f:
        if stem_suffix == ".json":
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise PreferenceDataError(f"{path}: not valid JSON: {e}") from None
            if not isinstance(data, list):
                raise PreferenceDataError(f"{path}: a .json file must hold a list of rows")
            for i, row in enumerate(data, 1):
                yield f"{path}, row {i}", row
            return
        row_number = 0
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row_number += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:  # handed on, so that skip_invalid can skip it
                row = PreferenceDataError(f"{path}, row {row_number} (line {line_number}): not JSON: {e}")
            yield f"{path}, row {row_number}", row


# ----------------------------------------------------------------------------------------------------------
# Formats -> PreferenceRecord


def _require(row: Any, keys: Sequence[str], where: str) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise PreferenceDataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for key in keys:
        if key not in row:
            raise PreferenceDataError(f"{where}: missing field {key!r} (has {sorted(row)})")
    return row


def preference_record(row: Any, where: str) -> PreferenceRecord:
    """TRL's explicit-prompt rows, the store's export, and TRL's implicit-prompt conversations."""
    row = _require(row, ("chosen", "rejected"), where)
    if "prompt" in row:
        return _distinct(PreferenceRecord.from_dict(row, where), where)
    chosen, rejected = row["chosen"], row["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise PreferenceDataError(
            f"{where}: missing field 'prompt' (without it, chosen and rejected must be whole conversations)"
        )
    n = 0  # the shared prefix of the two conversations is the prompt
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise PreferenceDataError(f"{where}: chosen and rejected conversations share no prompt")
    record = PreferenceRecord.from_dict(
        {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}, where
    )
    return _distinct(record, where)


def _distinct(record: PreferenceRecord, where: str) -> PreferenceRecord:
    """A file's strict pair must hold two different answers (one cannot be better than itself); a tie of
    the same text is consistent and kept."""
    if not record.tie and record.chosen == record.rejected:
        raise PreferenceDataError(
            f"{where}: fields 'chosen' and 'rejected' are the same text in a pair that is not a tie; "
            "a preference needs two different answers (or tie: true)"
        )
    return record


_HUMAN, _ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def parse_hh_transcript(text: Any, where: str, field_name: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: q\\n\\nAssistant: a ..."`` -> [{"role": "user", ...}, {"role": "assistant", ...}, ...].

    Lossless: a turn's content is the text between its tag and the next one, byte for byte, less the one
    space that follows ``Human:`` / ``Assistant:`` (part of the tag); spaces and newlines inside, before or
    after the words are kept, so ``hh_transcript`` of the messages is the original text again."""
    if not isinstance(text, str):
        raise PreferenceDataError(
            f"{where}: field {field_name!r} must be a string, got {type(text).__name__}"
        )
    messages: list[dict[str, str]] = []
    pos = 0
    while True:
        starts = [(text.find(tag, pos), tag) for tag in (_HUMAN, _ASSISTANT)]
        starts = [(i, tag) for i, tag in starts if i >= 0]
        if not starts:
            break
        i, tag = min(starts)
        if not messages and text[:i].strip():
            raise PreferenceDataError(f"{where}: field {field_name!r} has text before the first turn")
        if messages:
            messages[-1]["content"] = _turn_text(text[pos:i])
        messages.append({"role": "user" if tag == _HUMAN else "assistant", "content": ""})
        pos = i + len(tag)
    if not messages:
        raise PreferenceDataError(
            f"{where}: field {field_name!r} has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns"
        )
    messages[-1]["content"] = _turn_text(text[pos:])
    return messages


def _turn_text(raw: str) -> str:
    return raw[1:] if raw.startswith(" ") else raw


def hh_transcript(messages: Sequence[Mapping[str, Any]]) -> str:
    """Chat messages (user / assistant) back to an HH-RLHF transcript: the inverse of ``parse_hh_transcript``."""
    tags = {"user": _HUMAN, "assistant": _ASSISTANT}
    return "".join(f"{tags[m['role']]} {m['content']}" for m in messages)


def hh_rlhf_record(row: Any, where: str) -> PreferenceRecord:
    """An HH-RLHF pair: the prompt is the turns both transcripts share up to the last user turn. The text
    is kept byte for byte (``parse_hh_transcript``). A pair of the same answer twice is refused, as in every
    other format (it states no preference)."""
    row = _require(row, ("chosen", "rejected"), where)
    chosen = parse_hh_transcript(row["chosen"], where, "chosen")
    rejected = parse_hh_transcript(row["rejected"], where, "rejected")
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise PreferenceDataError(f"{where}: field {name!r} does not end with an assistant turn")
    prompt = chosen[:-1]
    if rejected[:-1] != prompt:
        raise PreferenceDataError(
            f"{where}: fields 'chosen' and 'rejected' differ before their last assistant turn "
            "(not one prompt with two answers)"
        )
    record = PreferenceRecord.from_dict(
        {
            "prompt": prompt,
            "chosen": chosen[-1]["content"],
            "rejected": rejected[-1]["content"],
            "provenance": {"source": "hh_rlhf"},
            "id": row.get("id"),
        },
        where,
    )
    return _distinct(record, where)  # helpful-base test has two pairs of one answer twice


def oasst_zh_record(row: Any, where: str) -> PreferenceRecord:
    """An OASST1-zh ranked pair; margin = rejected_rank - chosen_rank (>= 1)."""
    row = _require(row, ("prompt", "chosen", "rejected"), where)
    history = row.get("history") or []
    if not isinstance(history, list):
        raise PreferenceDataError(f"{where}: field 'history' must be a list of [user, assistant] pairs")
    messages = []
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise PreferenceDataError(f"{where}: field 'history'[{i}] must be [user text, assistant text]")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise PreferenceDataError(f"{where}: field 'prompt' must be a non-empty string")
    messages.append({"role": "user", "content": row["prompt"]})
    ranks = row.get("chosen_rank"), row.get("rejected_rank")
    margin = float(ranks[1] - ranks[0]) if all(isinstance(r, int) for r in ranks) else None
    record = PreferenceRecord.from_dict(
        {
            "prompt": messages,
            "chosen": row["chosen"],
            "rejected": row["rejected"],
            "margin": margin,
            "id": row.get("id"),
            "provenance": {"source": row.get("source", "oasst_rm_zh")},
        },
        where,
    )
    return _distinct(record, where)  # a ranked list can hold one reply twice


FORMATS = {"preference": preference_record, "hh_rlhf": hh_rlhf_record, "oasst_zh": oasst_zh_record}


def detect_format(row: Any) -> str:
    """Guess a row's format from its fields (``FORMATS`` key)."""
    if isinstance(row, Mapping):
        if "history" in row and "chosen_rank" in row:
            return "oasst_zh"
        if "prompt" not in row and isinstance(row.get("chosen"), str) and _HUMAN in row["chosen"]:
            return "hh_rlhf"
    return "preference"


@dataclass
class ReadResult:
    records: list[PreferenceRecord]
    skipped: list[str] = field(default_factory=list)  # one error message per skipped row


def read_preferences(
    source: str | Path | Iterable[Mapping[str, Any]],
    format: str = "auto",
    skip_invalid: bool = False,
    limit: int | None = None,
    name: str = "data",
) -> ReadResult:
    """Read preference pairs from a file / ``datasets`` folder path, or from rows (a ``datasets.Dataset`` or a
    list of dicts, named ``name`` in errors). ``format``: "auto" (per file, from its first row) or a
    ``FORMATS`` key. Invalid rows raise ``PreferenceDataError`` (file, row, field), or with ``skip_invalid``
    are left out and reported in ``skipped``. ``limit``: stop after that many records."""
    if isinstance(source, (str, Path)):
        rows: Iterable[tuple[str, Any]] = iter_rows(source)
    else:
        rows = ((f"{name}, row {i}", row) for i, row in enumerate(source, 1))
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {', '.join(FORMATS)}, got {format!r}")
    result = ReadResult([])
    reader = None if format == "auto" else FORMATS[format]
    # a file's rows without an id of their own (HH-RLHF has none) are named by file and row, e.g.
    # "helpful-base/test.jsonl.gz:12", so that duplicates and skipped rows can be reported by id
    prefix = f"{Path(source).parent.name}/{Path(source).name}" if isinstance(source, (str, Path)) else name
    for n, (where, row) in enumerate(rows, 1):
        if reader is None and not isinstance(row, PreferenceDataError):
            reader = FORMATS[detect_format(row)]
        try:
            if isinstance(row, PreferenceDataError):
                raise row
            record = reader(row, where)
            if record.id is None and reader is hh_rlhf_record:
                record = replace(record, id=f"{prefix}:{n}")
            result.records.append(record)
        except PreferenceDataError as e:
            if not skip_invalid:
                raise
            result.skipped.append(str(e))
        if limit is not None and len(result.records) >= limit:
            break
    return result


# ----------------------------------------------------------------------------------------------------------
# Annotator reliability -> per-pair weights


# ----------------------------------------------------------------------------------------------------------
# Loading a config's pairs


def load_records(cfg: PreferenceDataConfig, seed: int) -> tuple[list, list, dict[str, Any]]:
    """Training and held-out ``PreferenceRecord``s for ``cfg`` (world or files, plus ``extra_paths``), and a
    summary of where they came from. ``both_bad: drop`` leaves "both bad" pairs out of training only;
    ``both_bad_weight`` < 1 keeps them as ties with that weight."""
    train, held, facts = _load_records(cfg, seed)
    both_bad = [(r.provenance or {}).get("label") == "both_bad" for r in train]
    if cfg.both_bad == "drop":
        keep = [r for r, bad in zip(train, both_bad, strict=True) if not bad]
        facts["both_bad_dropped"] = len(train) - len(keep)
        train = keep
    elif cfg.both_bad_weight != 1.0:
        w = cfg.both_bad_weight
        train = [
            replace(r, weight=r.weight * w) if bad else r for r, bad in zip(train, both_bad, strict=True)
        ]
        facts["both_bad_weighted"] = sum(both_bad)
    return train, held, facts


def _load_records(cfg: PreferenceDataConfig, seed: int) -> tuple[list, list, dict[str, Any]]:
    """(train records, held-out records, facts about them) from the embedded world or from files, plus the
    training pairs of ``cfg.extra_paths`` (e.g. a preferences stage's export)."""
    train, held, facts = _load_source(cfg, seed)
    extra = cfg.extra_paths
    if extra:
        added, skipped = [], []
        for path in extra:
            if not Path(path).exists():
                raise ConfigError(
                    f"data.extra_paths: no preference file at {path} (run the preferences stage)"
                )
            res = read_preferences(path, "auto", cfg.skip_invalid)
            added += res.records
            skipped += res.skipped
        train = train + added
        random.Random(seed + 1).shuffle(train)
        facts = {**facts, "extra_pairs": len(added), "extra_skipped": len(skipped)}
    return train, held, facts


def _world_pairs(w: WorldPairsConfig, seed: int) -> tuple[list, list, dict[str, Any]]:
    """The embedded world's candidate pairs for the train (+ dev) and held-out prompts, labelled by the
    simulated annotators."""
    from glmwb.annotation.annotators import preference_pairs
    from glmwb.pretrain.world import make_world

    world = make_world(seed=w.seed, num_entities=w.num_entities)
    a = w.annotators
    noise = list(a.noise_per_annotator) or a.noise
    parts = [("train", w.train_prompts), ("dev", w.dev_prompts), (w.heldout_split, w.heldout_prompts)]
    pairs = {
        split: preference_pairs(
            world,
            world.prompts(split, n, seed=seed, phrasings=w.dev_phrasings if split == "dev" else None),
            a.n,
            noise,
            seed=seed,
            labels_per_pair=a.labels_per_pair,
            strength=a.strength,
            contrastive=w.contrastive if split in ("train", "dev") else 0.0,
            contrast_kinds=w.contrast_kinds,
        )  # fmt: skip
        for split, n in parts
    }
    train = records_from_dicts(pairs["train"] + pairs["dev"], "world train pairs")
    if pairs["dev"]:
        random.Random(seed).shuffle(train)
    held = records_from_dicts(pairs[w.heldout_split], "world held-out pairs")
    info = {"source": "world", "noise": noise, "annotators": a.n, "heldout_split": w.heldout_split}
    return train, held, {**info, "dev_pairs": len(pairs["dev"])}


def _load_source(cfg: PreferenceDataConfig, seed: int) -> tuple[list, list, dict[str, Any]]:
    if cfg.source == "world":
        return _world_pairs(cfg.world, seed)
    skipped: list[str] = []
    train = []
    for path in cfg.paths:
        res = read_preferences(path, cfg.format, cfg.skip_invalid)
        train += res.records
        skipped += res.skipped
    if cfg.eval_paths:
        held = []
        for path in cfg.eval_paths:
            res = read_preferences(path, cfg.format, cfg.skip_invalid)
            held += res.records
            skipped += res.skipped
    else:  # a seeded split of the training files
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(cfg.eval_fraction * len(train)))
        held = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in order[n_eval:]]
    random.Random(seed).shuffle(train)
    return train, held, {"source": "files", "skipped_rows": len(skipped), "skipped_examples": skipped[:5]}
