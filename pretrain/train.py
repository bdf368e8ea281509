"""The pretraining loop: AdamW, warm-up + cosine, gradient accumulation, clipping, bf16 autocast on
CUDA, held-out evaluation, resumable checkpoints, a progress bar with tokens/s, metrics and a plot.

Single-device: the loop talks to the strategy every trainer shares (pretrain/strategy.py), as SingleDevice.
The run folder (pretrain/run_folder.py) holds:
    metrics.jsonl                one JSON line per logged step / evaluation
    loss.png                     training and held-out loss curves, the learning rate
    checkpoints/step_000123/     Hugging Face folder + trainer_state.pt (optimizer, RNG states, data
                                 position) — `resume: true` continues from the newest complete one
    final/                       the trained model as a Hugging Face folder (+ tokenizer, glmwb_run.json)
    summary.json                 losses before / after, tokens/s, the budget record (steps done of planned)
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from glmwb.pretrain.data import DedupConfig, FilterConfig
from glmwb.pretrain.optim import OptimConfig, lr_at, make_optimizer
from glmwb.pretrain.ranges import Fraction, NonNegInt, PositiveFloat, PositiveInt, Range
from glmwb.pretrain.run_folder import (
    METRICS,
    Budget,
    Curve,
    MetricsLog,
    Panel,
    TimeLimit,
    latest_checkpoint,
    load_trainer_state,
    plot_curves,
    rng_state,
    run_title,
    save_checkpoint,
    set_rng_state,
    truncate_metrics,
)
from glmwb.pretrain.strategy import SingleDevice

if TYPE_CHECKING:
    from glmwb.pretrain.model import GLM


@dataclass(frozen=True)
class DataConfig:
    """The packed token data: which tokenizer, how long a row, how much is held out."""

    tokenizer: str = "runs/tokenizer"  # a Hugging Face tokenizer folder (the tokenizer stage's output)
    seq_len: PositiveInt = 256
    heldout_fraction: Fraction = 0.02
    cache_dir: str | None = None  # where packed data goes; default <run.dir>/data
    filter: FilterConfig | None = field(default_factory=FilterConfig)  # null: keep every document
    dedup: DedupConfig = field(default_factory=DedupConfig)
    # a finished `stage: data` build (sharded token files); set, it replaces the in-memory pipeline above
    shards: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    batch_size: PositiveInt = 16  # rows per micro-batch
    grad_accum: PositiveInt = 1  # micro-batches per optimizer step
    max_steps: PositiveInt = 1000
    max_minutes: PositiveFloat | None = None  # stop early (and save) when the wall clock says so
    eval_every: NonNegInt = 100
    eval_batches: PositiveInt = 20
    log_every: PositiveInt = 10
    save_every: NonNegInt = 500
    keep_checkpoints: NonNegInt = 2
    resume: bool = True  # continue from the newest checkpoint in the run folder, if any
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast dtype; auto = bf16 on CUDA
    gradient_checkpointing: bool = False  # recompute each block's forward in the backward (less memory)
    compile: bool = False  # torch.compile the model (under DeepSpeed: the engine's compile)
    init_from: str | None = None  # start from a Hugging Face / our GLM folder instead of random weights
    num_threads: PositiveInt | None = None  # torch CPU threads; default: all cores
    # several processes (torchrun / deepspeed launch one per GPU): each optimizer step takes
    # batch_size x grad_accum rows on every rank, so the global batch is that x world size
    strategy: Literal["single", "deepspeed"] = "single"
    zero_stage: Annotated[int, Range(1, 3)] = 2  # DeepSpeed ZeRO stage when strategy is deepspeed
    offload: bool = False  # ZeRO-Offload: optimizer states (ZeRO-3: parameters too) in CPU memory
    peak_tflops: PositiveFloat | None = None  # per device, for MFU; default: the table in pretrain/flops.py
    cross_document_attention: bool = False  # a packed row is one stream (positions 0..seq_len-1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    if name == "bfloat16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _inputs(batch: dict, device, one_stream: bool) -> dict:
    """The model's keyword inputs for a batch; ``one_stream``: no document mask, positions run the whole row."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    doc_ids = None if one_stream else batch["doc_ids"]
    return {"input_ids": batch["input_ids"], "doc_ids": doc_ids, "labels": batch["labels"]}


@torch.no_grad()
def evaluate(
    model: GLM, dataset, batch_size: int, num_batches: int, device, amp_dtype, one_stream: bool = False
) -> float:
    """Mean next-token loss (nats/token) over the first `num_batches` x `batch_size` held-out rows."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    rows = min(len(dataset), batch_size * num_batches)
    for start in range(0, rows, batch_size):
        batch = _inputs(dataset.batch(np.arange(start, min(start + batch_size, rows))), device, one_stream)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(**batch, return_logits=False)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total_loss += float(out.loss) * n
        total_tokens += n
    model.train(was_training)
    return total_loss / max(1, total_tokens)


LOSS_PANELS = (
    Panel(
        "next-token loss",
        "loss (nats / token)",
        (
            Curve("loss", "train", where=(("kind", "train"),)),
            Curve("heldout_loss", "held-out", where=(("kind", "eval"),), markers=True),
        ),
        hline="unigram_baseline",
        hline_label="unigram baseline",
    ),
    Panel("learning rate", "learning rate", (Curve("lr", "AdamW lr (warm-up + cosine)"),)),
)


class StopSignal:
    """While entered, SIGTERM (what a scheduler or ``kill`` sends before it kills) only sets ``received``;
    the loop reads it after each step, saves a checkpoint and stops. Installed from the main thread only
    (elsewhere Python cannot take signals, and the flag stays False)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.signals, self.received, self._old = signals, None, {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


@dataclass
class _Run:
    """What the steps of ``train`` share."""

    model: Any  # what the strategy prepared: a DeepSpeed engine, or the GLM itself
    core: GLM  # the plain module
    fwd: Any  # what the forward calls (compiled or not)
    optimizer: Any
    strategy: SingleDevice
    device: torch.device
    amp_dtype: torch.dtype | None
    optim_cfg: OptimConfig
    cfg: TrainConfig
    batches: Any
    metrics: MetricsLog
    run_dir: Path
    tokenizer: Any
    flops_token: float  # training FLOPs per token (pretrain/flops.py)
    peak: float | None  # TFLOP/s per device; None: no MFU (a CPU)


def _resume(run_dir: Path, model, optimizer, batches, device, log, strategy) -> tuple[int, int]:
    """Load the newest checkpoint of ``run_dir`` (weights, optimizer, data position, RNG) and cut
    metrics.jsonl back to its step; (step, tokens seen), or (0, 0) with metrics.jsonl removed when there is
    none."""
    from glmwb.pretrain.errors import ConfigError
    from glmwb.pretrain.hf import load_pretrained

    metrics = MetricsLog(run_dir / METRICS, enabled=strategy.is_main)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        metrics.reset()
        return 0, 0
    state = load_trainer_state(ckpt, map_location=device)
    if state.get("optimizer") is None or strategy.zero_stage > 0:
        raise ConfigError(
            f"{ckpt}: resuming under DeepSpeed (or from a checkpoint a DeepSpeed run wrote: no optimizer state "
            "in it) is not supported yet; start over with train.resume=false or a new run.dir, or continue "
            f"from its weights with train.init_from={ckpt}"
        )
    model.load_state_dict(load_pretrained(ckpt).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    batches.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    step = state["step"]
    log(f"resumed from {ckpt} at step {step}")
    truncate_metrics(metrics.path, step)  # rows written after that checkpoint come again
    return step, state.get("tokens_seen", 0)


def _train_step(r: _Run, micro: list[dict]) -> tuple[float, float]:
    """One optimizer step over the global step's micro-batches ``micro`` (this rank takes every
    world_size-th); returns (loss over all ranks, grad norm before clipping)."""
    # Normalise by the target tokens of the whole step, not per micro-batch, so that
    # grad_accum x batch_size x ranks is the same optimisation whatever the split (1x8 == 8x1 == 2 ranks x 4).
    step_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    world = r.strategy.world_size
    loss_sum = 0.0
    for batch in micro[r.strategy.rank :: world]:
        inputs = _inputs(batch, r.device, r.cfg.cross_document_attention)
        with torch.autocast(r.device.type, dtype=r.amp_dtype, enabled=r.amp_dtype is not None):
            out = r.fwd(**inputs, return_logits=False)
        share = int((inputs["labels"][:, 1:] != -100).sum()) / max(1, step_tokens)
        # the strategy averages gradients over ranks: x world gives the gradient of the global mean
        r.strategy.backward(out.loss * share * world, r.model)
        loss_sum += float(out.loss.detach()) * share
    grad_norm = r.strategy.step(r.model, r.optimizer, r.optim_cfg.grad_clip)
    if world > 1:
        loss_sum = float(r.strategy.all_reduce(torch.tensor(loss_sum)))
    return loss_sum, grad_norm


def _setup(model: GLM, optim_cfg: OptimConfig, train_cfg: TrainConfig, seed: int):
    """Device, autocast dtype, threads, seed, the model on its device, and its optimizer (fused AdamW on
    CUDA unless ZeRO-Offload steps it on the CPU)."""
    device = resolve_device(train_cfg.device)
    amp_dtype = autocast_dtype(train_cfg.dtype, device)
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    seed_everything(seed)
    model.to(device)
    model.gradient_checkpointing = train_cfg.gradient_checkpointing
    # fused AdamW needs CUDA tensors; ZeRO-Offload steps the optimizer on the CPU
    offloaded = train_cfg.strategy == "deepspeed" and train_cfg.offload
    return device, amp_dtype, make_optimizer(model, optim_cfg, torch.device("cpu") if offloaded else device)


def _prepare(model, tokenizer, train_data, optim_cfg, train_cfg, run_dir, seed, strategy, log):
    """The shared state of a run, resumed from the newest checkpoint when asked; (run, step, tokens seen)."""
    from glmwb.pretrain.data import BatchIterator
    from glmwb.pretrain.flops import flops_per_token, peak_tflops

    device, amp_dtype, optimizer = _setup(model, optim_cfg, train_cfg, seed)
    batches = BatchIterator(train_data, train_cfg.batch_size, seed=seed)  # every rank draws every row
    metrics = MetricsLog(run_dir / METRICS, enabled=strategy.is_main)
    step, tokens_seen = 0, 0
    if train_cfg.resume:
        step, tokens_seen = _resume(run_dir, model, optimizer, batches, device, log, strategy)
    elif strategy.is_main:
        metrics.reset()
    engine, optimizer = strategy.prepare(model, optimizer)
    if not train_cfg.compile:
        fwd = engine
    elif engine is model:
        fwd = torch.compile(model)
    else:  # DeepSpeed compiles its engine in place (untested on GPU here)
        engine.compile()
        fwd = engine
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    run = _Run(engine, model, fwd, optimizer, strategy, device, amp_dtype, optim_cfg, train_cfg, batches,
               metrics, run_dir, tokenizer,
               flops_per_token(model.config, train_data.seq_len, causal=True),
               peak_tflops(name, train_cfg.peak_tflops))  # fmt: skip
    return run, step, tokens_seen


def _heldout_before(loss0: float, metrics: MetricsLog, unigram_baseline: float | None, log) -> float:
    metrics.write({"kind": "eval", "step": 0, "heldout_loss": loss0})
    if unigram_baseline is not None:
        metrics.write({"kind": "baseline", "step": 0, "unigram_baseline": unigram_baseline})
    log(f"held-out loss before training: {loss0:.4f}")
    return loss0


def _checkpoint(r: _Run, step: int, tokens_seen: int) -> None:
    """A Hugging Face folder plus what resume needs (optimizer, RNG, data position, tokens seen); under
    DeepSpeed the whole weights only (its partitioned optimizer state is not saved yet)."""
    from glmwb.pretrain.hf import save_pretrained

    with r.strategy.gathered(r.model):  # collective under ZeRO-3: every rank enters, the main one writes
        if not r.strategy.is_main:
            return
        optimizer = r.optimizer.state_dict() if r.strategy.zero_stage == 0 else None
        state = {"step": step, "optimizer": optimizer, "rng": rng_state(), "data": r.batches.state_dict(),
                 "tokens_seen": tokens_seen}  # fmt: skip
        save_checkpoint(
            r.run_dir, step, lambda folder: save_pretrained(r.core, folder, tokenizer=r.tokenizer), state,
            r.cfg.keep_checkpoints,
        )  # fmt: skip


def _plot_loss(model: GLM, run_dir: Path, metrics_path: Path, budget: Budget) -> None:
    cfg = model.config
    n_params = cfg.num_params()  # from the config: under ZeRO-3 this rank holds a slice of each parameter
    what = f"GLM, {n_params / 1e6:.2f}M parameters ({cfg.num_layers} layers, hidden {cfg.hidden_size})"
    plot_curves(
        metrics_path, run_dir / "loss.png", LOSS_PANELS, run_title("pretraining", run_dir, what, budget)
    )


def _stop_reason(r: _Run, limit: TimeLimit, stop: StopSignal) -> str | None:
    """Why the run stops after this step (SIGTERM, the time limit), the same on every rank; None: go on."""
    reason = f"{stop.received} received" if stop.received else (limit.reason if limit.reached() else None)
    if r.strategy.world_size > 1:  # every rank must stop at the same step
        code = 2.0 if stop.received else (1.0 if reason else 0.0)
        code = float(r.strategy.all_reduce(torch.tensor(code)))
        reason = reason or (None if code == 0 else ("SIGTERM received" if code >= 2 else limit.reason))
    return reason


def _log_step(r: _Run, step: int, loss: float, lr: float, grad_norm: float, tokens: int, window) -> str:
    """One metrics row: loss, lr, grad norm, tokens seen, tokens/s and MFU (when the device has a peak)
    over the steps since the last row; returns the progress bar's text."""
    from glmwb.pretrain.flops import mfu

    now = time.time()
    tps = window["tokens"] / max(1e-9, now - window["t"])
    window.update(t=now, tokens=0)
    row = {"kind": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
           "tokens_per_s": tps}  # fmt: skip
    util = mfu(r.flops_token, tps / r.strategy.world_size, r.peak)
    if util is not None:
        row["mfu"] = util
    r.metrics.write(row)
    return f"{tps:,.0f}" + (f", MFU {util:.1%}" if util is not None else "")


def _loop(r: _Run, step: int, tokens_seen: int, heldout_loss, summary: dict) -> tuple[int, int, str | None]:
    """Steps until max_steps, SIGTERM or the time limit; (step, tokens seen, why it stopped early)."""
    cfg = r.cfg
    world = r.strategy.world_size
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * r.batches.dataset.seq_len
    limit, window = TimeLimit(cfg.max_minutes), {"t": time.time(), "tokens": 0}
    data_iter = iter(r.batches)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not r.strategy.is_main)  # fmt: skip
    with StopSignal() as stop:
        while step < cfg.max_steps:
            lr = lr_at(step, r.optim_cfg, cfg.max_steps)
            for group in r.optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = _train_step(r, [next(data_iter) for _ in range(cfg.grad_accum * world)])
            step += 1
            tokens_seen += tokens_per_step
            window["tokens"] += tokens_per_step
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                tps = _log_step(r, step, loss, lr, grad_norm, tokens_seen, window)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=tps)
            reason = _stop_reason(r, limit, stop)
            last = step == cfg.max_steps or reason is not None
            if step % cfg.eval_every == 0 or last:
                held = heldout_loss()
                r.metrics.write({"kind": "eval", "step": step, "heldout_loss": held})
                bar.write(f"step {step}: held-out loss {held:.4f}") if r.strategy.is_main else None
                summary["heldout_loss_after"] = held
            if step % cfg.save_every == 0 or last:
                _checkpoint(r, step, tokens_seen)
            if reason is not None and step < cfg.max_steps:
                bar.write(f"{reason} at step {step} of {cfg.max_steps}; checkpoint saved")
                bar.close()
                return step, tokens_seen, reason
    bar.close()
    return step, tokens_seen, None


def train(
    model: GLM,
    tokenizer,
    train_data,
    heldout_data,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    run_dir: str | Path,
    seed: int = 0,
    log: Callable[[str], None] = print,
    unigram_baseline: float | None = None,
    strategy: SingleDevice | None = None,
    on_done: Callable[[GLM, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train `model` on packed `train_data` through ``strategy`` (default: the one ``train_cfg`` names, set
    up here); returns a summary (losses before / after, tokens/s, the budget record, ...). ``on_done(model,
    summary)`` runs on the main rank at the end with whole parameters (to save the final model)."""
    from glmwb.pretrain.strategy import make_strategy

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if strategy is None:
        strategy = make_strategy(
            train_cfg.strategy, train_cfg.zero_stage, optim_cfg.grad_clip, train_cfg.offload
        )
        strategy.setup()
    r, step, tokens_seen = _prepare(
        model, tokenizer, train_data, optim_cfg, train_cfg, run_dir, seed, strategy, log
    )

    def heldout_loss() -> float:
        return evaluate(r.model, heldout_data, train_cfg.batch_size, train_cfg.eval_batches, r.device,
                        r.amp_dtype, train_cfg.cross_document_attention)  # fmt: skip

    summary: dict[str, Any] = {"start_step": step}
    if step == 0:
        summary["heldout_loss_before"] = _heldout_before(heldout_loss(), r.metrics, unigram_baseline, log)
    r.model.train()
    started = time.time()
    step, tokens_seen, reason = _loop(r, step, tokens_seen, heldout_loss, summary)
    elapsed = time.time() - started
    if "heldout_loss_after" not in summary:  # resumed from its last step (a finished curriculum stage)
        summary["heldout_loss_after"] = heldout_loss()
    budget = Budget("pretrain", train_cfg.max_steps, step, reason is not None, reason)
    if strategy.is_main:
        _plot_loss(model, run_dir, r.metrics.path, budget)
    tokens_per_step = train_cfg.batch_size * train_cfg.grad_accum * strategy.world_size * train_data.seq_len
    summary.update(
        steps=step,
        tokens_seen=tokens_seen,
        seconds=elapsed,
        tokens_per_s=(step - summary["start_step"]) * tokens_per_step / max(1e-9, elapsed),
        stopped_early=reason is not None,
        signal=(reason.split()[0] if reason and reason.startswith("SIG") else None),
        device=str(r.device),
        world_size=strategy.world_size,
        zero_stage=strategy.zero_stage,
        budget=budget.to_dict(),
    )
    with strategy.generation_context(r.model) as whole:  # collective under ZeRO-3
        if strategy.is_main and on_done is not None:
            on_done(whole, summary)
    return summary
