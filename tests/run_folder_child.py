"""A tiny pretraining run with a checkpoint at every step, for the kill test in tests/test_run_folder.py.

    python tests/run_folder_child.py DATA_DIR RUN_DIR VOCAB_SIZE MAX_STEPS [KIND:N]

With KIND:N the process kills itself with SIGKILL (what `kill -9` sends) at the N-th operation of that kind
that the run folder makes: in the middle of it where it can be cut (a half-written model file or trainer
state, a half-removed folder, half a metrics line), else just before it. It first writes the operation it
dies at to RUN_DIR/../kills.log. Kinds: model, state, fsync, rename, rmtree, replace, metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

import torch


def arm(kind_n: str, log: Path) -> None:
    """Patch the run folder's file operations so that the chosen one kills the process."""
    from glmwb.pretrain import hf, run_folder

    kind, n = kind_n.split(":")
    target, seen = (kind, int(n)), Counter()

    def due(k: str, what: object) -> bool:
        seen[k] += 1
        if (k, seen[k]) != target:
            return False
        with log.open("a") as f:
            f.write(f"{kind_n} {what}\n")
        return True

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def cut(path: Path) -> None:  # keep the first half of a file just written
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])

    real_save_file, real_torch_save = hf.save_file, torch.save
    real_fsync, real_rename, real_rmtree, real_replace = (
        run_folder.fsync_path,
        Path.rename,
        shutil.rmtree,
        os.replace,
    )
    real_write = run_folder.MetricsLog.write

    def save_file(state, path, **kw):
        real_save_file(state, path, **kw)
        if due("model", path):
            cut(path)
            die()

    def torch_save(obj, path, *a, **kw):
        real_torch_save(obj, path, *a, **kw)
        if due("state", path):
            cut(path)
            die()

    def fsync_path(path):
        if due("fsync", path):
            die()
        real_fsync(path)

    def rename(self, to):
        if due("rename", f"{self} -> {to}"):
            die()
        return real_rename(self, to)

    def rmtree(path, *a, **kw):
        if due("rmtree", path):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for p in files[: max(1, len(files) // 2)]:
                p.unlink()
            die()
        return real_rmtree(path, *a, **kw)

    def replace(src, dst):
        if due("replace", dst):
            die()
        return real_replace(src, dst)

    def write(self, row):
        if self.enabled and due("metrics", row.get("step")):
            text = json.dumps(row)
            with self.path.open("a") as f:
                f.write(text[: len(text) // 2])
            die()
        real_write(self, row)

    hf.save_file, torch.save, run_folder.fsync_path = save_file, torch_save, fsync_path
    Path.rename, shutil.rmtree, os.replace, run_folder.MetricsLog.write = rename, rmtree, replace, write


def main(argv: list[str]) -> int:
    from glmwb.pretrain.config import GLMConfig
    from glmwb.pretrain.data import load_packed
    from glmwb.pretrain.model import GLM
    from glmwb.pretrain.train import OptimConfig, TrainConfig, train

    data, run_dir, vocab, max_steps = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3])
    if len(argv) > 4:
        arm(argv[4], run_dir.parent / "kills.log")
    torch.manual_seed(0)
    cfg = GLMConfig(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=12, max_position_embeddings=256)  # fmt: skip
    train_cfg = TrainConfig(batch_size=4, max_steps=max_steps, eval_every=3, eval_batches=2, log_every=1,
                            save_every=1, keep_checkpoints=2, num_threads=1)  # fmt: skip
    train(GLM(cfg), None, load_packed(data / "train"), load_packed(data / "heldout"),
          OptimConfig(lr=3e-3, warmup_steps=2), train_cfg, run_dir, seed=0, log=lambda s: None)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
