"""The pretraining loop: AdamW, warm-up + cosine, gradient accumulation, clipping, bf16 autocast on
CUDA, held-out evaluation, resumable checkpoints, a progress bar with tokens/s, metrics and a plot.

Single-device code; parallelism (DeepSpeed) wraps it from outside in a later stage.
A run folder holds:
    metrics.jsonl                one JSON line per logged step / evaluation
    loss.png                     training and held-out loss curves
    checkpoints/step_000123/     Hugging Face folder + trainer_state.pt (optimizer, scheduler,
                                 RNG states, data position) — `resume: true` continues from the newest
    final/                       the trained model as a Hugging Face folder (+ tokenizer)
"""

from __future__ import annotations

import json
import random
import shutil
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

if TYPE_CHECKING:
    from glmwb.pretrain.model import GLM


@dataclass(frozen=True)
class DataConfig:
    """The packed token data: which tokenizer, how long a row, how much is held out."""

    tokenizer: str = "runs/tokenizer"  # a Hugging Face tokenizer folder (the tokenizer stage's output)
    seq_len: int = 256
    heldout_fraction: float = 0.02
    cache_dir: str | None = None  # where packed data goes; default <run.dir>/data
    filter: FilterConfig | None = field(default_factory=FilterConfig)  # null: keep every document
    dedup: DedupConfig = field(default_factory=DedupConfig)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    max_minutes: float | None = None  # stop early (and save) when the wall clock says so
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in the run folder, if any
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast dtype; auto = bf16 on CUDA
    gradient_checkpointing: bool = False
    compile: bool = False
    init_from: str | None = None  # start from a Hugging Face / our GLM folder instead of random weights
    num_threads: int | None = None  # torch CPU threads; default: all cores


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


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(
    run_dir: Path, model, tokenizer, optimizer, step: int, data_state: dict, extra: dict, keep: int
) -> Path:
    from glmwb.pretrain.hf import save_pretrained

    final = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, tokenizer=tokenizer)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "data": data_state,
        **extra,
    }
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a checkpoint is complete or absent, never half-written
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def plot_losses(metrics_path: Path, out_png: Path, title: str = "pretraining") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    held = [(r["step"], r["heldout_loss"]) for r in rows if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=False), label="train loss", lw=1)
    if held:
        ax.plot(*zip(*held, strict=False), "o-", label="held-out loss", lw=1.5)
    baseline = next((r["unigram_baseline"] for r in rows if "unigram_baseline" in r), None)
    if baseline:
        ax.axhline(baseline, ls="--", color="gray", label=f"unigram baseline ({baseline:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


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
    """Train `model` on packed `train_data`; returns a summary (losses before / after, tokens/s, ...)."""
    from glmwb.pretrain.data import BatchIterator

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(train_cfg.device)
    amp_dtype = autocast_dtype(train_cfg.dtype, device)
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    seed_everything(seed)
    model.to(device)
    model.gradient_checkpointing = train_cfg.gradient_checkpointing
    optimizer = make_optimizer(model, optim_cfg, device)
    batches = BatchIterator(train_data, train_cfg.batch_size, seed=seed)
    step, tokens_seen = 0, 0
    metrics_path = run_dir / "metrics.jsonl"

    existing = checkpoint_dirs(run_dir) if train_cfg.resume else []
    if existing:
        from glmwb.pretrain.hf import load_pretrained

        ckpt = existing[-1]
        model.load_state_dict(load_pretrained(ckpt).state_dict())
        state = torch.load(ckpt / "trainer_state.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state.get("tokens_seen", 0)
        log(f"resumed from {ckpt} at step {step}")
        if metrics_path.exists():  # drop lines written after that checkpoint
            keep = [
                ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step
            ]
            metrics_path.write_text("".join(line + "\n" for line in keep))
    elif metrics_path.exists():
        metrics_path.unlink()

    fwd = torch.compile(model) if train_cfg.compile else model

    def heldout_loss() -> float:
        return evaluate(model, heldout_data, train_cfg.batch_size, train_cfg.eval_batches, device, amp_dtype)

    def write(row: dict) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    summary: dict[str, Any] = {"start_step": step}
    if step == 0:
        loss0 = heldout_loss()
        summary["heldout_loss_before"] = loss0
        write({"kind": "eval", "step": 0, "heldout_loss": loss0})
        if unigram_baseline is not None:
            write({"kind": "baseline", "step": 0, "unigram_baseline": unigram_baseline})
        log(f"held-out loss before training: {loss0:.4f}")

    model.train()
    tokens_per_step = train_cfg.batch_size * train_cfg.grad_accum * train_data.seq_len
    started = time.time()
    window_t, window_tokens = time.time(), 0
    data_iter = iter(batches)
    bar = tqdm(total=train_cfg.max_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)
    stopped_early = False
    while step < train_cfg.max_steps:
        lr = lr_at(step, optim_cfg, train_cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Normalise by the target tokens of the whole step, not per micro-batch, so that
        # grad_accum x batch_size is the same optimisation whatever the split (1x8 == 8x1).
        micro = [next(data_iter) for _ in range(train_cfg.grad_accum)]
        step_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        loss_sum = 0.0
        for batch in micro:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = fwd(
                    batch["input_ids"], doc_ids=batch["doc_ids"], labels=batch["labels"], return_logits=False
                )
            share = int((batch["labels"][:, 1:] != -100).sum()) / max(1, step_tokens)
            (out.loss * share).backward()
            loss_sum += float(out.loss.detach()) * share
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip))
            if optim_cfg.grad_clip > 0
            else float("nan")
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        bar.update(1)

        if step % train_cfg.log_every == 0 or step == train_cfg.max_steps:
            now = time.time()
            tps = window_tokens / max(1e-9, now - window_t)
            window_t, window_tokens = now, 0
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            write(
                {
                    "kind": "train",
                    "step": step,
                    "loss": loss_sum,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens_seen,
                    "tokens_per_s": tps,
                }
            )
        out_of_time = (
            train_cfg.max_minutes is not None and (time.time() - started) > 60 * train_cfg.max_minutes
        )
        last = step == train_cfg.max_steps or out_of_time
        if step % train_cfg.eval_every == 0 or last:
            held = heldout_loss()
            write({"kind": "eval", "step": step, "heldout_loss": held})
            bar.write(f"step {step}: held-out loss {held:.4f}")
            summary["heldout_loss_after"] = held
        if step % train_cfg.save_every == 0 or last:
            save_checkpoint(
                run_dir,
                model,
                tokenizer,
                optimizer,
                step,
                batches.state_dict(),
                {"tokens_seen": tokens_seen},
                train_cfg.keep_checkpoints,
            )
        if out_of_time and step < train_cfg.max_steps:
            stopped_early = True
            bar.write(f"max_minutes ({train_cfg.max_minutes}) reached at step {step}; checkpoint saved")
            break
    bar.close()
    elapsed = time.time() - started
    plot_losses(metrics_path, run_dir / "loss.png")
    summary.update(
        steps=step,
        tokens_seen=tokens_seen,
        seconds=elapsed,
        tokens_per_s=(step - summary["start_step"]) * tokens_per_step / max(1e-9, elapsed),
        stopped_early=stopped_early,
        device=str(device),
    )
    return summary
