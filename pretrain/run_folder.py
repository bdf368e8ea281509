"""The run folder every trainer writes (pretraining, the reward model, SFT, DPO, GRPO, PPO), in one place:

    <run.dir>/
        config.yaml            the resolved recipe (written by recipes/cli.py before the stage runs)
        metrics.jsonl          one JSON object per line: {"step": N, ...}; non-finite numbers are null;
                               a last line cut short by a killed writer is skipped, and dropped on resume
        *.png                  the trainer's curves (plot_curves), titled with the run, model and budget
        checkpoints/step_N/    a loadable model folder + trainer_state.pt (optimizer, counters, RNG, data)
        final/                 the trained model + glmwb_run.json (stage, steps done of planned, why it
                               stopped, the model it started from)
        summary.json           the stage's figures + "budget": the same record (written atomically)

Checkpoints are written to ``step_N.tmp``, fsynced and renamed, so a folder named ``step_N`` is complete; an
older checkpoint is removed only after the new one is in place, and by renaming it first, so a kill at any
moment leaves the newest complete checkpoint loadable. Leftovers of a killed save are cleaned at the next save
or resume. ``trainer_state.pt`` is read with ``torch.load(weights_only=True)``: tensors and plain data only,
so resuming a folder from elsewhere cannot run its code (``CheckpointError`` names the refused object).

Budgets: a stage plans steps; ``train.max_minutes`` is a wall-clock safety net (``TimeLimit``). ``Budget``
records planned and done steps and why a run stopped early; it goes into summary.json, next to the saved
model (``write_model_record``), and into the pipeline's closing lines (recipes/cli.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
TRAINER_STATE = "trainer_state.pt"
MODEL_RECORD = "glmwb_run.json"
_STEP_DIR = re.compile(r"step_(\d+)")
# leftovers of a killed save / rotation: .tmp (being written), .old (being replaced), .del (being removed)
_LEFTOVER = re.compile(r"(step_\d+)\.(tmp|old|del)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (e.g. a trainer_state.pt holding code to run)."""


# ----------------------------------------------------------------------------------------------------------
# Durable files


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder: the names in it, e.g. after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then the folders bottom-up: a rename then publishes whole files."""
    paths = list(Path(folder).rglob("*"))
    for p in paths:
        if p.is_file():
            fsync_path(p)
    for d in sorted([p for p in paths if p.is_dir()] + [Path(folder)], key=lambda p: -len(p.parts)):
        fsync_path(d)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file next to ``path``, fsync it and rename it over ``path``: readers see
    the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


def write_json(path: str | Path, obj: Any, default: Callable[[Any], Any] | None = str) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=default))


# ----------------------------------------------------------------------------------------------------------
# metrics.jsonl


def _finite(value: Any) -> Any:
    """NaN / inf -> None (strict JSON), through lists and dicts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _metric_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of each complete line of ``path``. A last line that does not parse is a write cut short
    by a kill and is left out; a bad line before the last one is an error naming it."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == last:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line: {line[:80]!r}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i + 1}: a metrics line must be a JSON object, got {line[:80]!r}")
        out.append((line, row))
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (none when it does not exist); tolerates a truncated last line."""
    return [row for _, row in _metric_lines(Path(path))]


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the rows of ``path`` up to ``step`` (a row without "step" counts as step 0) and drop the rest and
    any truncated last line: what a run resumed from the checkpoint of ``step`` must not see twice. Returns
    the number of rows kept."""
    path = Path(path)
    if not path.exists():
        return 0
    keep = [line for line, row in _metric_lines(path) if (row.get("step") or 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    return len(keep)


class MetricsLog:
    """Appends rows to a metrics.jsonl, one JSON object per line; a no-op when ``enabled`` is false (the
    ranks other than the main one)."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(_finite(row)) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)

    def reset(self) -> None:
        """A fresh run: forget the rows of an earlier one."""
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dirs(run_dir: str | Path, with_state: bool = False) -> list[Path]:
    """The complete checkpoints of a run, oldest first: ``checkpoints/step_N`` folders (any number of digits;
    leftovers of killed saves never match); ``with_state``: only those with a trainer_state.pt."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and (not with_state or (p / TRAINER_STATE).is_file()):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint a run can resume from (one with trainer_state.pt), after cleaning the leftovers
    of a save that was killed half-way."""
    clean_partial_checkpoints(run_dir)
    found = checkpoint_dirs(run_dir, with_state=True)
    return found[-1] if found else None


def clean_partial_checkpoints(run_dir: str | Path) -> list[str]:
    """Remove what a killed save or rotation left: ``step_N.tmp`` (half-written), ``step_N.del`` (half-
    removed), ``step_N.old`` (a complete checkpoint moved aside to be replaced: put back when the new one
    never took its place). Returns the names removed."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        m = _LEFTOVER.fullmatch(p.name)
        if not m:
            continue
        if m.group(2) == "old" and not (root / m.group(1)).exists():
            p.rename(root / m.group(1))
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        removed.append(p.name)
    if removed:
        fsync_path(root)
    return removed


def _remove_checkpoint(folder: Path) -> None:
    gone = folder.with_name(folder.name + ".del")
    folder.rename(gone)  # atomic: the name step_N disappears whole, then the files go
    shutil.rmtree(gone)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    write_model: Callable[[Path], Any],
    state: dict[str, Any] | None = None,
    keep: int = 0,
    digits: int = 6,
) -> Path:
    """Write ``checkpoints/step_<step>``: ``write_model(folder)`` puts the model files in, ``state`` goes to
    trainer_state.pt (None: a model folder only). Written under a temporary name, fsynced, then renamed; the
    ``keep`` newest checkpoints stay (0: all), older ones are removed once the new one is complete."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    clean_partial_checkpoints(run_dir)
    final = root / f"step_{step:0{digits}d}"
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir()
    write_model(tmp)
    if state is not None:
        torch.save(state, tmp / TRAINER_STATE)
    fsync_tree(tmp)
    if final.exists():  # the same step saved again: the old folder stays until the new one has its name
        old = final.with_name(final.name + ".old")
        final.rename(old)
        tmp.rename(final)
        fsync_path(root)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_path(root)
    for stale in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        _remove_checkpoint(stale)
    return final


def _numpy_array_globals() -> list[Any]:
    """What unpickling a plain numpy array needs (checkpoints that stored numpy's RNG state as an array)."""
    from numpy._core import multiarray

    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]
    return [
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *dtypes,
    ]


def load_trainer_state(checkpoint: str | Path, map_location: Any = None) -> dict[str, Any]:
    """A checkpoint's trainer_state.pt, with ``torch.load(weights_only=True)``: tensors, numbers, strings and
    containers of them (and numpy arrays) load; anything else is refused, never run."""
    path = Path(checkpoint) / TRAINER_STATE
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it refers to {found.group(1)}" if found else str(e).splitlines()[0][:200]
        raise CheckpointError(
            f"{path}: refused to load: it holds more than tensors and plain data ({what}), and unpickling "
            "that could run code. Resume only from checkpoints written by glmwb; to start over, set "
            "train.resume=false or use a new run.dir"
        ) from None


# ----------------------------------------------------------------------------------------------------------
# RNG state (plain data: loads under weights_only)


def rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's (and CUDA's) RNG states as tensors and plain numbers."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    if isinstance(n, dict):
        key = n["key"].cpu().numpy().astype(np.uint32)
        np.random.set_state((n["kind"], key, n["pos"], n["has_gauss"], n["gauss"]))
    else:  # a numpy state tuple as np.random.get_state() returns it
        np.random.set_state(n)
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ----------------------------------------------------------------------------------------------------------
# Budgets


class TimeLimit:
    """The wall-clock safety net ``max_minutes`` (None: none), counted from construction."""

    def __init__(self, max_minutes: float | None, key: str = "train.max_minutes") -> None:
        self.max_minutes, self.key = max_minutes, key
        self.started = time.time()

    def reached(self) -> bool:
        return self.max_minutes is not None and time.time() - self.started > 60 * self.max_minutes

    @property
    def reason(self) -> str:
        return f"{self.key}={self.max_minutes:g} reached"


@dataclass(frozen=True)
class Budget:
    """How much of its planned steps a stage trained, and why it stopped short when it did."""

    stage: str
    planned_steps: int
    steps_done: int
    stopped_early: bool = False
    reason: str | None = None  # e.g. "train.max_minutes=30 reached"

    def line(self) -> str:
        """'600 of 600 steps' or 'stopped early at step 418 of 600 (train.max_minutes=30 reached)'."""
        if self.stopped_early:
            why = f" ({self.reason})" if self.reason else ""
            return f"stopped early at step {self.steps_done} of {self.planned_steps}{why}"
        return f"{self.steps_done} of {self.planned_steps} steps"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "line": self.line()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Budget:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    @classmethod
    def combine(cls, stage: str, parts: Sequence[Budget], part: str = "run") -> Budget:
        """Several training runs of one stage (online DPO's rounds, an ensemble's members) as one record."""
        early = [(i, p) for i, p in enumerate(parts, 1) if p.stopped_early]
        reason = "; ".join(f"{part} {i}: {p.line()}" for i, p in early) or None
        return cls(stage, sum(p.planned_steps for p in parts), sum(p.steps_done for p in parts),
                   bool(early), reason)  # fmt: skip


def write_summary(
    run_dir: str | Path,
    summary: dict[str, Any],
    budget: Budget | None = None,
    default: Callable[[Any], Any] | None = str,
) -> Path:
    """summary.json (atomically), with the budget record under "budget" (also set in ``summary``)."""
    if budget is not None:
        summary["budget"] = budget.to_dict()
    return write_json(Path(run_dir) / SUMMARY, summary, default)


@functools.cache
def source_commit() -> str | None:
    """The git commit of the glmwb source, when it runs from a checkout (None otherwise)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def write_model_record(
    folder: str | Path, budget: Budget, run_dir: str | Path, init_from: str | Path | None = None
) -> Path:
    """glmwb_run.json next to a saved model's config.json: the stage and run that trained it, steps done of
    planned, whether (and why) it stopped early, the model it started from (and whether that one, or one
    before it, stopped early), the recipe's hash and the source commit."""
    config = Path(run_dir) / "config.yaml"
    start = read_model_record(init_from) if init_from else None
    record = {
        **budget.to_dict(),
        "run_dir": str(run_dir),
        "init_from": str(init_from) if init_from else None,
        "upstream_stopped_early": bool(
            start and (start.get("stopped_early") or start.get("upstream_stopped_early"))
        ),
        "recipe_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "source_commit": source_commit(),
    }
    return write_json(Path(folder) / MODEL_RECORD, record)


def read_model_record(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MODEL_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def training_line(folder: str | Path, short: bool = False) -> str | None:
    """How the model in ``folder`` was trained, from its glmwb_run.json: '48 of 48 steps', 'stopped early at
    step 24 of 48 (...)', with a note when a model it was trained from stopped early (``short``: without that
    model's path); None without a record."""
    record = read_model_record(folder)
    if record is None:
        return None
    line = Budget.from_dict(record).line()
    if record.get("upstream_stopped_early"):
        start = "a model" if short else record.get("init_from")
        line += f"; started from {start} whose training (or an earlier one) stopped early"
    return line


def describe_model(folder: str | Path) -> str:
    """'sft: 48 of 48 steps', 'pretrain: stopped early at step 418 of 600 (...)', or 'no training record'."""
    line = training_line(folder)
    if line is None:
        return f"no training record ({MODEL_RECORD})"
    return f"{read_model_record(folder).get('stage', '?')}: {line}"


def cut_short(folder: str | Path) -> bool:
    """Whether the model in ``folder``, or one it was trained from, stopped its training early."""
    record = read_model_record(folder) or {}
    return bool(record.get("stopped_early") or record.get("upstream_stopped_early"))


# ----------------------------------------------------------------------------------------------------------
# Curves


@dataclass(frozen=True)
class Curve:
    key: str  # a metrics.jsonl field
    label: str
    where: tuple[tuple[str, Any], ...] = ()  # only rows with these field values, e.g. (("kind", "eval"),)
    markers: bool = False  # evaluations: points joined by lines
    band: str | None = None  # a field holding the curve's standard deviation, drawn as a band


@dataclass(frozen=True)
class Panel:
    """One quantity: its title, its axis label with the unit, the curves of it."""

    title: str
    ylabel: str
    curves: tuple[Curve, ...]
    hline: str | None = None  # a field whose (first) value is drawn as a dashed reference line
    hline_label: str = ""
    bars: bool = False  # one bar per curve: its mean over the rows, the value written on the bar
    share: bool = False  # a fraction in [0, 1]: the axis starts at 0


def _points(rows: Iterable[dict[str, Any]], curve: Curve) -> list[tuple[float, float]]:
    pts = [
        (r["step"], r[curve.key])
        for r in rows
        if isinstance(r.get(curve.key), (int, float))
        and "step" in r
        and all(r.get(k) == v for k, v in curve.where)
    ]
    return sorted(pts, key=lambda p: p[0])


def _draw_panel(ax, rows: list[dict[str, Any]], panel: Panel, xlabel: str) -> None:
    if panel.bars:
        means = [(c.label, [y for _, y in _points(rows, c)]) for c in panel.curves]
        means = [(label, sum(ys) / len(ys)) for label, ys in means if ys]
        bars = ax.bar(
            [m[0] for m in means], [m[1] for m in means], color=[f"C{i}" for i in range(len(means))]
        )
        ax.bar_label(bars, fmt="%.3g", padding=2, fontsize=8)
        ax.margins(y=0.15)
    for i, curve in enumerate([] if panel.bars else panel.curves):
        pts = _points(rows, curve)
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        label = f"{curve.label} (last {ys[-1]:.3g})"
        ax.plot(xs, ys, "o-" if curve.markers or len(xs) < 30 else "-", color=f"C{i}", lw=1.2, ms=3.5,
                label=label)  # fmt: skip
        if curve.band:
            sd = {r["step"]: r.get(curve.band) or 0.0 for r in rows if curve.key in r and "step" in r}
            lo = [y - sd.get(x, 0.0) for x, y in pts]
            hi = [y + sd.get(x, 0.0) for x, y in pts]
            ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.18, label=f"{curve.label} ± 1 std")
    ref = next((r[panel.hline] for r in rows if isinstance(r.get(panel.hline), (int, float))), None)
    if panel.hline and ref is not None:
        ax.axhline(ref, ls="--", color="gray", lw=1, label=f"{panel.hline_label} ({ref:.3g})")
    if panel.share:
        ax.set_ylim(bottom=0.0)
    ax.set_title(panel.title, fontsize=10)
    ax.set_ylabel(panel.ylabel)
    if not panel.bars:
        from matplotlib.ticker import MaxNLocator

        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0] and not panel.bars:
        ax.legend(fontsize=7.5)


def plot_curves(
    metrics: str | Path | Sequence[dict[str, Any]],
    out_png: str | Path,
    panels: Sequence[Panel],
    title: str,
    xlabel: str = "optimizer step",
    ncols: int = 3,
) -> Path | None:
    """Draw ``panels`` from a metrics.jsonl (or its rows) into ``out_png``, one quantity per panel, under
    ``title`` (say which run and which model: ``run_title``). Panels without data are left out; None when
    none has any."""
    rows = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    panels = [p for p in panels if any(_points(rows, c) for c in p.curves)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.4 * nrows + 0.8), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        _draw_panel(ax, rows, panel, xlabel)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def run_title(what: str, run_dir: str | Path, model: str | None = None, budget: Budget | None = None) -> str:
    """Two lines for a figure: what it shows and of which model; the run folder and how much of its budget
    ran."""
    first = f"{what} — {model}" if model else what
    return f"{first}\nrun {run_dir}" + (f" · {budget.line()}" if budget else "")
