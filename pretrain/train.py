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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from glmwb.pretrain.data import DedupConfig, FilterConfig
from glmwb.pretrain.optim import OptimConfig, lr_at, make_optimizer
from glmwb.pretrain.ranges import Fraction, NonNegInt, PositiveFloat, PositiveInt
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
    gradient_checkpointing: bool = False
    compile: bool = False
    init_from: str | None = None  # start from a Hugging Face / our GLM folder instead of random weights
    num_threads: PositiveInt | None = None  # torch CPU threads; default: all cores


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


@torch.no_grad()
def evaluate(model: GLM, dataset, batch_size: int, num_batches: int, device, amp_dtype) -> float:
    """Mean next-token loss (nats/token) over the first `num_batches` x `batch_size` held-out rows."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    rows = min(len(dataset), batch_size * num_batches)
    for start in range(0, rows, batch_size):
        batch = dataset.batch(np.arange(start, min(start + batch_size, rows)))
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(
                batch["input_ids"], doc_ids=batch["doc_ids"], labels=batch["labels"], return_logits=False
            )
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


def _resume(run_dir: Path, model, optimizer, batches, device, log) -> tuple[int, int]:
    """Load the newest checkpoint of ``run_dir`` (weights, optimizer, data position, RNG) and cut
    metrics.jsonl back to its step; (step, tokens seen), or (0, 0) with metrics.jsonl removed when there is
    none."""
    from glmwb.pretrain.hf import load_pretrained

    metrics = MetricsLog(run_dir / METRICS)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        metrics.reset()
        return 0, 0
    state = load_trainer_state(ckpt, map_location=device)
    model.load_state_dict(load_pretrained(ckpt).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    batches.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    step = state["step"]
    log(f"resumed from {ckpt} at step {step}")
    truncate_metrics(metrics.path, step)  # rows written after that checkpoint come again
    return step, state.get("tokens_seen", 0)


def _train_step(
    model,
    fwd,
    optimizer,
    micro: list[dict],
    optim_cfg: OptimConfig,
    device,
    amp_dtype,
    strategy: SingleDevice,
):
    """One optimizer step over the micro-batches ``micro``; returns (loss, grad norm before clipping)."""
    # Normalise by the target tokens of the whole step, not per micro-batch, so that
    # grad_accum x batch_size is the same optimisation whatever the split (1x8 == 8x1).
    step_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    loss_sum = 0.0
    for batch in micro:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = fwd(
                batch["input_ids"], doc_ids=batch["doc_ids"], labels=batch["labels"], return_logits=False
            )
        share = int((batch["labels"][:, 1:] != -100).sum()) / max(1, step_tokens)
        strategy.backward(out.loss * share, model)
        loss_sum += float(out.loss.detach()) * share
    return loss_sum, strategy.step(model, optimizer, optim_cfg.grad_clip)


def _setup(model: GLM, optim_cfg: OptimConfig, train_cfg: TrainConfig, seed: int):
    """Device, autocast dtype, threads, seed, the model on its device, and its optimizer."""
    device = resolve_device(train_cfg.device)
    amp_dtype = autocast_dtype(train_cfg.dtype, device)
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    seed_everything(seed)
    model.to(device)
    model.gradient_checkpointing = train_cfg.gradient_checkpointing
    return device, amp_dtype, make_optimizer(model, optim_cfg, device)


def _heldout_before(loss0: float, metrics: MetricsLog, unigram_baseline: float | None, log) -> float:
    metrics.write({"kind": "eval", "step": 0, "heldout_loss": loss0})
    if unigram_baseline is not None:
        metrics.write({"kind": "baseline", "step": 0, "unigram_baseline": unigram_baseline})
    log(f"held-out loss before training: {loss0:.4f}")
    return loss0


def _checkpoint(
    run_dir: Path, step: int, model, tokenizer, optimizer, batches, tokens_seen: int, keep: int
) -> None:
    """A Hugging Face folder plus what resume needs (optimizer, RNG, data position, tokens seen)."""
    from glmwb.pretrain.hf import save_pretrained

    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
             "data": batches.state_dict(), "tokens_seen": tokens_seen}  # fmt: skip
    save_checkpoint(
        run_dir, step, lambda folder: save_pretrained(model, folder, tokenizer=tokenizer), state, keep
    )


def _plot_loss(model: GLM, run_dir: Path, metrics_path: Path, budget: Budget) -> None:
    cfg, n_params = model.config, sum(p.numel() for p in model.parameters())
    what = f"GLM, {n_params / 1e6:.2f}M parameters ({cfg.num_layers} layers, hidden {cfg.hidden_size})"
    plot_curves(
        metrics_path, run_dir / "loss.png", LOSS_PANELS, run_title("pretraining", run_dir, what, budget)
    )


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
) -> dict[str, Any]:
    """Train `model` on packed `train_data`; returns a summary (losses before / after, tokens/s, the budget
    record, ...)."""
    from glmwb.pretrain.data import BatchIterator

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device, amp_dtype, optimizer = _setup(model, optim_cfg, train_cfg, seed)
    strategy = SingleDevice()  # one device: the data loader is not sharded over ranks
    batches = BatchIterator(train_data, train_cfg.batch_size, seed=seed)
    metrics = MetricsLog(run_dir / METRICS)
    step, tokens_seen = 0, 0
    if train_cfg.resume:
        step, tokens_seen = _resume(run_dir, model, optimizer, batches, device, log)
    else:
        metrics.reset()

    fwd = torch.compile(model) if train_cfg.compile else model

    def heldout_loss() -> float:
        return evaluate(model, heldout_data, train_cfg.batch_size, train_cfg.eval_batches, device, amp_dtype)

    summary: dict[str, Any] = {"start_step": step}
    if step == 0:
        summary["heldout_loss_before"] = _heldout_before(heldout_loss(), metrics, unigram_baseline, log)

    model.train()
    tokens_per_step = train_cfg.batch_size * train_cfg.grad_accum * train_data.seq_len
    limit = TimeLimit(train_cfg.max_minutes)
    window_t, window_tokens = time.time(), 0
    data_iter = iter(batches)
    bar = tqdm(total=train_cfg.max_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)
    stopped_early = False
    while step < train_cfg.max_steps:
        lr = lr_at(step, optim_cfg, train_cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [next(data_iter) for _ in range(train_cfg.grad_accum)]
        loss_sum, grad_norm = _train_step(
            model, fwd, optimizer, micro, optim_cfg, device, amp_dtype, strategy
        )
        step += 1
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        bar.update(1)

        if step % train_cfg.log_every == 0 or step == train_cfg.max_steps:
            now = time.time()
            tps = window_tokens / max(1e-9, now - window_t)
            window_t, window_tokens = now, 0
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            metrics.write({"kind": "train", "step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                           "tokens": tokens_seen, "tokens_per_s": tps})  # fmt: skip
        out_of_time = limit.reached()
        last = step == train_cfg.max_steps or out_of_time
        if step % train_cfg.eval_every == 0 or last:
            held = heldout_loss()
            metrics.write({"kind": "eval", "step": step, "heldout_loss": held})
            bar.write(f"step {step}: held-out loss {held:.4f}")
            summary["heldout_loss_after"] = held
        if step % train_cfg.save_every == 0 or last:
            _checkpoint(
                run_dir, step, model, tokenizer, optimizer, batches, tokens_seen, train_cfg.keep_checkpoints
            )
        if out_of_time and step < train_cfg.max_steps:
            stopped_early = True
            bar.write(f"{limit.reason} at step {step} of {train_cfg.max_steps}; checkpoint saved")
            break
    bar.close()
    elapsed = time.time() - limit.started
    budget = Budget(
        "pretrain", train_cfg.max_steps, step, stopped_early, limit.reason if stopped_early else None
    )
    _plot_loss(model, run_dir, metrics.path, budget)
    summary.update(
        steps=step,
        tokens_seen=tokens_seen,
        seconds=elapsed,
        tokens_per_s=(step - summary["start_step"]) * tokens_per_step / max(1e-9, elapsed),
        stopped_early=stopped_early,
        device=str(device),
        budget=budget.to_dict(),
    )
    return summary
