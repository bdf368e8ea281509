"""python -m glmwb.pretrain.world --out DIR: the files it writes."""

from __future__ import annotations

import json
import subprocess
import sys

from glmwb.pretrain.world import Prompt, make_world
from glmwb.pretrain.world.cli import main


def test_cli_writes_files(tmp_path, capsys) -> None:
    argv = f"--out {tmp_path} --seed 3 --num-docs 300 --num-train 60 --num-heldout 20".split()
    assert main(argv) == 0
    corpus = [
        json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert len(corpus) == 300 and all(set(d) == {"text"} for d in corpus)
    assert corpus[0]["text"] == make_world(3).corpus(300, seed=3)[0]
    for split, n in (("train", 60), ("heldout", 20)):
        rows = (tmp_path / f"prompts_{split}.jsonl").read_text(encoding="utf-8").splitlines()
        prompts = [Prompt.from_dict(json.loads(line)) for line in rows]
        assert len(prompts) == n and prompts == make_world(3).prompts(split, n, seed=3)
    out = capsys.readouterr().out
    assert "corpus: 300 docs" in out and "prompts_heldout: 20" in out and "fact/zh" in out


def test_python_m_runs_the_cli(tmp_path) -> None:
    argv = ["--out", str(tmp_path), "--num-docs", "20", "--num-train", "10", "--num-heldout", "5"]
    done = subprocess.run(
        [sys.executable, "-m", "glmwb.pretrain.world", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "prompts_train: 10" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "corpus.jsonl",
        "prompts_heldout.jsonl",
        "prompts_train.jsonl",
        "world.json",
    ]
