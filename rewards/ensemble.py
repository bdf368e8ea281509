"""Reward-model ensembles: several RMs trained on the same pairs from different seeds, scored as one.

    r(x, y) = mean_i r_i(x, y) − penalty · std_i r_i(x, y)

The mean of the members' rewards (their logits of the same Bradley–Terry / tie model, so on one scale)
averages out what each member learnt by chance; on the embedded world 0.5-1 point of the annotators'
ceiling above its members when they were trained on different pairs (docs/rewards.md),
less on the same pairs from other seeds, as ``model.ensemble`` trains them. ``penalty`` > 0 makes the reward
conservative where the members disagree — the uncertainty-weighted objective against over-optimisation
(Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"; Eisenstein et al. 2023).

On disk an ensemble is a normal reward folder — member 0, loadable alone by ``RewardModel.from_pretrained``
and by transformers' ``GlmForSequenceClassification`` — plus ``ensemble.json`` naming the other members'
folders (relative, normally ``members/1`` ...) and ``reward_config.json`` of the ensemble in
``ensemble_config.json`` (its reward mean / std and evaluation). ``load_reward_model(folder)`` gives a
``RewardEnsemble`` for such a folder and a ``RewardModel`` otherwise; ``RewardScorer`` (PPO, the scoring API,
annotation suggestions, the arena) and the reward evaluation load through it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from glmwb.rewards.model import RewardInfo, RewardModel

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_INFO = "ensemble_config.json"


class RewardEnsemble(nn.Module):
    """``forward`` as ``RewardModel.forward``: rewards (N, K) = mean over members − penalty · std."""

    def __init__(
        self, members: Sequence[RewardModel], penalty: float = 0.0, info: RewardInfo | None = None
    ) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 reward models, got {len(members)}")
        if penalty < 0:
            raise ValueError(f"ensemble penalty must be >= 0, got {penalty}")
        first = members[0]
        for i, m in enumerate(members[1:], 1):
            if m.heads != first.heads:
                raise ValueError(f"ensemble member {i} has heads {m.heads}, member 0 has {first.heads}")
            if m.info.terminator != first.info.terminator:
                raise ValueError(
                    f"ensemble member {i} reads the reward after {m.info.terminator!r}, "
                    f"member 0 after {first.info.terminator!r}"
                )
            if m.config.vocab_size != first.config.vocab_size:
                raise ValueError(
                    f"ensemble member {i} has vocabulary {m.config.vocab_size}, member 0 {first.config.vocab_size}"
                )
        self.members = nn.ModuleList(members)
        self.penalty = float(penalty)
        self.heads = list(first.heads)
        self.info = info or replace(
            first.info,
            reward_mean=[],
            reward_std=[],
            extra={"ensemble": {"members": len(members), "penalty": self.penalty}},
        )

    @property
    def config(self):
        return self.members[0].config

    def forward(self, input_ids: Tensor, score_index: Tensor, *args, **kwargs) -> Tensor:
        kwargs.pop("return_hidden", None)
        r = torch.stack([m(input_ids, score_index, *args, **kwargs).float() for m in self.members])
        out = r.mean(0)
        if self.penalty:
            out = out - self.penalty * r.std(0)
        return out

    def member_rewards(self, input_ids: Tensor, score_index: Tensor, *args, **kwargs) -> Tensor:
        """(members, N, K): each member's rewards, for disagreement."""
        return torch.stack([m(input_ids, score_index, *args, **kwargs).float() for m in self.members])

    def save(self, folder: str | Path, tokenizer=None, member_folders: Sequence[str | Path] = ()) -> Path:
        """Member 0 as the folder itself, the others copied to ``folder/members/i`` (or, when
        ``member_folders`` are given — already-saved reward folders of members 1.. — moved there)."""
        folder = Path(folder)
        self.members[0].save(folder, tokenizer)
        names = []
        for i, m in enumerate(self.members[1:], 1):
            target = folder / "members" / str(i)
            shutil.rmtree(target, ignore_errors=True)
            if member_folders:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(member_folders[i - 1], target)
            else:
                m.save(target, tokenizer)
            names.append(f"members/{i}")
        (folder / ENSEMBLE_FILE).write_text(
            json.dumps({"members": names, "penalty": self.penalty}, indent=2) + "\n"
        )
        (folder / ENSEMBLE_INFO).write_text(json.dumps(asdict(self.info), indent=2, ensure_ascii=False))
        return folder


def is_ensemble(folder: str | Path) -> bool:
    return (Path(folder) / ENSEMBLE_FILE).is_file()


def load_reward_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    penalty: float | None = None,
) -> RewardModel | RewardEnsemble:
    """A ``RewardEnsemble`` for a folder with ``ensemble.json`` (``penalty`` overrides the saved one), else
    ``RewardModel.from_pretrained(folder)``."""
    folder = Path(folder)
    if not is_ensemble(folder):
        return RewardModel.from_pretrained(folder, dtype=dtype, device=device)
    spec = json.loads((folder / ENSEMBLE_FILE).read_text())
    names = spec.get("members")
    if not isinstance(names, list) or not names:
        raise ValueError(f"{folder / ENSEMBLE_FILE}: 'members' must list the other members' folders")
    members = [RewardModel.from_pretrained(folder, dtype=dtype, device=device)]
    for name in names:
        if not (folder / name / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder / ENSEMBLE_FILE}: member folder {folder / name} has no config.json"
            )
        members.append(RewardModel.from_pretrained(folder / name, dtype=dtype, device=device))
    info = None
    if (folder / ENSEMBLE_INFO).is_file():
        info = RewardInfo(**json.loads((folder / ENSEMBLE_INFO).read_text()))
    return RewardEnsemble(members, spec.get("penalty", 0.0) if penalty is None else penalty, info)
