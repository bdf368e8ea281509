"""Stage entry points for `glmwb run`: load config → build → train → save. Short on purpose."""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from glmwb.kernels.config import KernelConfig
from glmwb.pretrain.config import GLMConfig
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.optim import OptimConfig
from glmwb.pretrain.ranges import PositiveFloat, PositiveInt, Range
from glmwb.pretrain.settings import RunConfig, WorldConfig
from glmwb.pretrain.train import DataConfig, TrainConfig


@dataclass(frozen=True)
class CorpusConfig:
    """Where pretraining / tokenizer text comes from: the embedded world or JSONL / text files."""

    source: Literal["world", "files"] = "world"
    paths: tuple[str, ...] = ()  # JSONL ("text" field, .gz allowed) or .txt files when source is "files"
    world: WorldConfig = field(default_factory=WorldConfig)
    num_docs: PositiveInt = 20_000  # documents drawn from the world
    max_docs: PositiveInt | None = None  # cap on documents read from files
    # the world's document kinds and their weights (entity, arithmetic, conversion, chat); null: the
    # world's own mix. A curriculum's later stages weigh the task-shaped kinds (chat, arithmetic) up
    mix: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.source == "files" and not self.paths:
            raise ValueError("corpus.source is 'files' but corpus.paths is empty; list JSONL or .txt files")
        if self.mix is not None:
            from glmwb.pretrain.world.corpus import CORPUS_MIX

            unknown = sorted(set(self.mix) - set(CORPUS_MIX))
            if unknown or any(not (w >= 0) for w in self.mix.values()) or sum(self.mix.values()) <= 0:
                raise ValueError(
                    f"corpus.mix must weigh the kinds {', '.join(CORPUS_MIX)} with numbers >= 0 that sum "
                    f"above 0, got {dict(self.mix)}"
                    + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                )


@dataclass(frozen=True)
class ContextExtension:
    """Long-context continued training (GLM-4: 2K -> 32K -> 128K): the rotary settings the model takes on
    before this stage trains at the longer ``data.seq_len`` (null keeps the model's own)."""

    rope_theta: PositiveFloat | None = None  # a larger base: slower-turning frequencies for longer spans
    rope_scaling_factor: Annotated[float, Range(lo=1)] | None = None  # position interpolation
    max_position_embeddings: PositiveInt | None = None


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: PositiveInt = 4096
    min_frequency: PositiveInt = 2
    model_max_length: PositiveInt = 2048
    cjk: Literal["char", "run"] = "char"  # Han / kana: one token per character at most, or BPE over runs


@dataclass(frozen=True)
class TokenizerRecipe:
    """`stage: tokenizer` — train a byte-level BPE tokenizer with GLM's special tokens and chat template."""

    stage: Literal["tokenizer"] = "tokenizer"
    run: RunConfig = field(default_factory=RunConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass(frozen=True)
class PretrainRecipe:
    """`stage: pretrain` — data pipeline, then the pretraining loop, then samples."""

    stage: Literal["pretrain"] = "pretrain"
    run: RunConfig = field(default_factory=RunConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: GLMConfig = field(default_factory=GLMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelConfig | None = None  # null: plain PyTorch; a section picks Triton kernels per op (GPU)
    extend_context: ContextExtension | None = None  # applied to the model (new or train.init_from) first


def corpus_texts(cfg: CorpusConfig) -> list[str]:
    """The documents a corpus section names: drawn from the embedded world, or read from files."""
    if cfg.source == "world":
        from glmwb.pretrain.world import make_world

        world = make_world(seed=cfg.world.seed, num_entities=cfg.world.num_entities)
        return world.corpus(cfg.num_docs, seed=cfg.world.seed, mix=cfg.mix)
    from glmwb.pretrain.data import read_texts

    texts = read_texts(list(cfg.paths))
    return texts[: cfg.max_docs] if cfg.max_docs else texts


def run_tokenizer(recipe: TokenizerRecipe) -> dict[str, Any]:
    from glmwb.pretrain.tokenizer import train_tokenizer

    out = Path(recipe.run.dir)
    texts = corpus_texts(recipe.corpus)
    tok = train_tokenizer(
        texts,
        vocab_size=recipe.tokenizer.vocab_size,
        min_frequency=recipe.tokenizer.min_frequency,
        cjk=recipe.tokenizer.cjk,
    )
    tok.model_max_length = recipe.tokenizer.model_max_length
    tok.save_pretrained(out)
    chars = sum(len(t) for t in texts)
    tokens = sum(len(ids) for ids in tok(texts[:2000], add_special_tokens=False)["input_ids"])
    sample_chars = sum(len(t) for t in texts[:2000])
    summary = {
        "tokenizer": str(out),
        "vocab_size": len(tok),
        "docs": len(texts),
        "chars": chars,
        "chars_per_token": round(sample_chars / max(1, tokens), 3),
    }
    print(f"tokenizer: {len(tok)} tokens, {summary['chars_per_token']} chars/token → {out}")
    return summary


def load_tokenizer(path: str):
    """A GLM-4 tokenizer folder (one trained here, or THUDM's glm-4-9b-chat-hf): ids are read from it and it
    renders chats with this project's template (``pretrain.tokenizer.glm_tokenizer``)."""
    from glmwb.pretrain.tokenizer import load_glm_tokenizer

    if not (Path(path) / "tokenizer_config.json").is_file():
        raise ConfigError(
            f"data.tokenizer: no tokenizer folder at {path!r} (expected tokenizer_config.json there); "
            "run the tokenizer stage first (glmwb run recipes/tokenizer.yaml) or point data.tokenizer at one"
        )
    try:
        return load_glm_tokenizer(path)
    except ValueError as e:
        raise ConfigError(f"data.tokenizer: {path}: {e}") from None


def run_pretrain(recipe: PretrainRecipe) -> dict[str, Any]:
    from glmwb.pretrain.data import FilterConfig, build_dataset, load_packed, unigram_entropy
    from glmwb.pretrain.hf import load_pretrained, save_pretrained
    from glmwb.pretrain.model import GLM
    from glmwb.pretrain.run_folder import Budget, write_model_record, write_summary
    from glmwb.pretrain.strategy import make_strategy
    from glmwb.pretrain.tokenizer import turn_terminator_ids
    from glmwb.pretrain.train import train

    run_dir = Path(recipe.run.dir)
    tok = load_tokenizer(recipe.data.tokenizer)
    if len(tok) > recipe.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({recipe.model.vocab_size}) is smaller than the tokenizer's {len(tok)} tokens; "
            f"set model.vocab_size >= {len(tok)} (a multiple of 64 is fastest)"
        )
    strategy = make_strategy(
        recipe.train.strategy, recipe.train.zero_stage, recipe.optim.grad_clip, recipe.train.offload
    )
    strategy.setup()
    data_dir = Path(recipe.data.cache_dir or run_dir / "data")
    if recipe.data.shards:  # the streaming pipeline's output (glmwb run recipes/data.yaml)
        from glmwb.pretrain.stream import load_sharded

        train_data, heldout = load_sharded(recipe.data.shards, recipe.data.seq_len, tok)
    elif strategy.is_main and not (data_dir / "train" / "meta.json").is_file():
        stats = build_dataset(
            corpus_texts(recipe.corpus),
            tok,
            recipe.data.seq_len,
            data_dir,
            heldout_fraction=recipe.data.heldout_fraction,
            seed=recipe.run.seed,
            filter_cfg=recipe.data.filter or FilterConfig.accept_all(),
            dedup_cfg=recipe.data.dedup,
        )
        print(f"data: {json.dumps(stats)}")
    strategy.barrier()  # the other ranks read what the main one built
    if not recipe.data.shards:
        train_data, heldout = load_packed(data_dir / "train"), load_packed(data_dir / "heldout")
    baseline = unigram_entropy(train_data, heldout, len(tok))

    cfg = recipe.model.with_(pad_token_id=tok.pad_token_id, eos_token_ids=tuple(turn_terminator_ids(tok)))
    torch.manual_seed(recipe.run.seed)
    if recipe.train.init_from:
        model = load_pretrained(recipe.train.init_from, kernels=recipe.kernels)
    else:
        model = GLM(cfg, kernels=recipe.kernels)
    extend_context(model, recipe.extend_context)
    print(
        f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.num_layers} layers, hidden {model.config.hidden_size}"
    )

    def finish(whole, summary: dict[str, Any]) -> None:  # main rank, whole parameters
        if summary["signal"]:
            return  # terminated: the checkpoint is saved; leave quickly
        budget = Budget.from_dict(summary["budget"])
        save_pretrained(whole, run_dir / "final", tokenizer=tok)
        write_model_record(run_dir / "final", budget, run_dir, recipe.train.init_from)
        summary["samples"] = world_samples(whole, tok, recipe)

    summary = train(
        model, tok, train_data, heldout, recipe.optim, recipe.train, run_dir, seed=recipe.run.seed,
        unigram_baseline=baseline, strategy=strategy, on_done=finish,
    )  # fmt: skip
    summary["unigram_baseline"] = baseline
    budget = Budget.from_dict(summary["budget"])
    if strategy.is_main:
        write_summary(run_dir, summary, budget)
    if summary["signal"]:  # every rank: the launcher sees the run did not finish
        if strategy.is_main:
            print(f"pretrain: {budget.line()}; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(128 + signal.Signals[summary["signal"]].value)  # as the signal itself would
    if not strategy.is_main:
        return summary
    before = summary.get("heldout_loss_before", float("nan"))
    print(
        f"held-out loss: {before:.3f} before → {summary['heldout_loss_after']:.3f} after "
        f"(unigram baseline {baseline:.3f}); {summary['tokens_per_s']:,.0f} tokens/s; "
        f"model → {run_dir / 'final'} ({budget.line()})"
    )
    return summary


def extend_context(model, ext: ContextExtension | None) -> None:
    """Give ``model`` the rotary base / interpolation factor / position limit ``ext`` sets (the weights stay)."""
    if ext is None:
        return
    changes = {k: v for k in ("rope_theta", "rope_scaling_factor", "max_position_embeddings")
               if (v := getattr(ext, k)) is not None and v != getattr(model.config, k)}  # fmt: skip
    if changes:
        before = ", ".join(f"{k} {getattr(model.config, k):g} -> {v:g}" for k, v in changes.items())
        model.config = model.config.with_(**changes)
        print(f"context extension: {before}")


def world_samples(model, tok, recipe: PretrainRecipe, per_lang: int = 2) -> list[dict]:
    """Greedy answers to held-out world questions in both languages (chat format), checked by the world."""
    if recipe.corpus.source != "world":
        return []
    from glmwb.pretrain.generate import generate
    from glmwb.pretrain.tokenizer import render_chat, turn_terminator_ids
    from glmwb.pretrain.world import make_world

    world = make_world(seed=recipe.corpus.world.seed, num_entities=recipe.corpus.world.num_entities)
    prompts = world.prompts("heldout", 200, seed=recipe.run.seed)
    chosen = [p for p in prompts if p.lang == "en"][:per_lang] + [p for p in prompts if p.lang == "zh"][
        :per_lang
    ]
    ids = [
        tok(render_chat(tok, p.messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for p in chosen
    ]
    outs = (
        generate(
            model,
            ids,
            max_new_tokens=48,
            temperature=0.0,
            stop_token_ids=turn_terminator_ids(tok),
            pad_token_id=tok.pad_token_id,
        )
        if chosen
        else []
    )
    samples = []
    for p, out in zip(chosen, outs, strict=False):
        text = tok.decode(out, skip_special_tokens=True).strip()
        check = world.check(p, text)
        samples.append(
            {
                "lang": p.lang,
                "question": p.messages[-1]["content"],
                "answer": text,
                "gold": p.gold,
                "correct": check.correct,
            }
        )
        print(
            f"[{p.lang}] {p.messages[-1]['content']}\n  → {text}   (gold {p.gold}, correct={check.correct})"
        )
    return samples
