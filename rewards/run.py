"""`glmwb run recipes/reward.yaml`: load config → pairs → reward model → train → evaluate → save."""

from __future__ import annotations

import builtins
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from glmwb.annotation.preference_data import load_records
from glmwb.pretrain.errors import ConfigError
from glmwb.rewards.config import RewardRecipe


def split_value_first(recipe: RewardRecipe, records: list) -> tuple[list, list]:
    """``train.value_first``: the records whose ``attributes[name]`` is 0 (equal on it: the form pairs) and
    the others (the value pairs). Refuses a recipe without a single head and the likelihood features, and
    records without that attribute, naming the first rows."""
    name = recipe.train.value_first
    v = recipe.model.verifier
    if not v.enabled or len(recipe.model.heads) != 1:
        raise ConfigError(
            f"train.value_first={name!r} needs model.verifier.enabled: true and one head (model.heads: [reward]); "
            f"got enabled {v.enabled}, heads {list(recipe.model.heads)} "
            "(or set train.value_first: null for one joint fit)"
        )
    missing = [i + 1 for i, r in enumerate(records) if r.attributes.get(name) not in (-1, 0, 1)]
    if missing:
        raise ConfigError(
            f"train.value_first={name!r}: training records {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} of {len(records)}) have no attributes.{name} of -1, 0 or +1; label that attribute "
            "in every training record, or set train.value_first: null"
        )
    form = [r for r in records if r.attributes[name] == 0]
    value = [r for r in records if r.attributes[name] != 0]
    if not form or not value:
        raise ConfigError(
            f"train.value_first={name!r}: {len(form)} records call it equal and {len(value)} do not; "
            "both kinds are needed (the first train the head, the second the value weights)"
        )
    return form, value


def build_model(recipe: RewardRecipe, tok):
    from glmwb.pretrain.model import GLM
    from glmwb.rewards.model import RewardModel
    from glmwb.rewards.train import apply_lora

    heads = list(recipe.model.heads)
    if recipe.model.init_from:
        keep = recipe.loss.lm_coef > 0  # the auxiliary LM loss reads through the base's lm_head
        model = RewardModel.from_pretrained(recipe.model.init_from, heads=heads, keep_lm_head=keep)
    else:
        if recipe.loss.lm_coef > 0:
            raise ConfigError("loss.lm_coef needs model.init_from (a causal-LM folder with an lm_head)")
        cfg = recipe.model.config
        if cfg.vocab_size < len(tok):
            raise ConfigError(
                f"model.config.vocab_size ({cfg.vocab_size}) < the tokenizer's {len(tok)} tokens"
            )
        model = RewardModel(GLM(cfg.with_(pad_token_id=tok.pad_token_id)), heads)
    if model.heads != heads:
        raise ConfigError(f"model.heads {heads} != the heads of {recipe.model.init_from}: {model.heads}")
    if recipe.model.lora.enabled:
        apply_lora(model, recipe.model.lora)
    if recipe.model.verifier.enabled:
        attach_verifier(model, recipe, tok)
    return model


def attach_verifier(model, recipe: RewardRecipe, tok) -> None:
    """The frozen LM of ``model.verifier`` (``init`` = model.init_from), checked to be a causal LM that
    shares the reward model's tokenizer."""
    from glmwb.rewards.verifier import ASSISTANT_TOKEN, LikelihoodVerifier

    v = recipe.model.verifier
    folder = recipe.model.init_from if v.lm == "init" else v.lm
    if folder is None:
        raise ConfigError("model.verifier.lm: 'init' needs model.init_from; or give a causal-LM GLM folder")
    if not (Path(folder) / "config.json").is_file():
        raise ConfigError(f"model.verifier.lm: no model folder at {folder!r} (expected config.json there)")
    assistant_id = tok.convert_tokens_to_ids(ASSISTANT_TOKEN)
    if assistant_id is None or assistant_id == tok.unk_token_id:
        raise ConfigError(f"model.verifier: the tokenizer has no {ASSISTANT_TOKEN} token to find answers by")
    try:
        verifier = LikelihoodVerifier.from_pretrained(folder, assistant_id, v.features)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model.verifier.lm = {folder}: not a causal-LM GLM folder ({e})") from None
    if verifier.lm.config.vocab_size < len(tok):
        raise ConfigError(
            f"model.verifier.lm = {folder}: vocabulary {verifier.lm.config.vocab_size} < the tokenizer's {len(tok)}"
        )
    model.attach_verifier(verifier)


def run_reward(recipe: RewardRecipe) -> dict[str, Any]:
    from glmwb.pretrain.strategy import make_strategy
    from glmwb.rewards.model import reward_pad_id
    from glmwb.rewards.train import save_reward_folder, train_reward_model

    run_dir = Path(recipe.run.dir)
    baseline, tok = _check_folders(recipe)
    strategy = make_strategy(recipe.train.strategy, recipe.train.zero_stage, recipe.optim.grad_clip)
    strategy.setup()
    print = builtins.print if strategy.is_main else (lambda *a, **k: None)  # noqa: A001 (one rank talks)
    data = _load_pairs(recipe, tok, print)
    torch.manual_seed(recipe.run.seed)
    model = _build_model_logged(recipe, tok, data, print)
    pad_id = reward_pad_id(tok)
    summary = train_reward_model(
        model, tok, data.train_pairs, data.held_pairs, recipe.loss, recipe.optim, recipe.train, run_dir, pad_id,
        seed=recipe.run.seed, lora=recipe.model.lora.enabled, strategy=strategy, log=print,
        value_pairs=data.value_pairs,
    )  # fmt: skip
    with strategy.gathered(model):
        final = save_reward_folder(model, run_dir / "final", tok) if strategy.is_main else None
    if not strategy.is_main:
        return summary
    members, budget = _ensemble_members(recipe, tok, data, final, summary, pad_id, print)
    report = _evaluate(recipe, final, members, data, summary, budget, print)
    if baseline:
        summary["likelihood_baseline"] = _likelihood_baseline(
            baseline, recipe.data.max_length, data.held_records, report, run_dir, print
        )
    _write_records(recipe, final, summary, budget, report)
    print(f"reward model → {final} ({budget.line()}); evaluation → {run_dir / 'eval'}")
    return summary


@dataclass
class _Pairs:
    """The stage's records and their encoded pairs (``value_pairs``: ``train.value_first``'s other pairs)."""

    train_records: list
    held_records: list
    facts: dict[str, Any]
    train_pairs: list
    held_pairs: list
    train_stats: dict[str, Any]
    held_stats: dict[str, Any]
    value_pairs: list | None = None


def _check_folders(recipe: RewardRecipe) -> tuple[str | None, Any]:
    """The likelihood baseline's folder and the tokenizer, or a ConfigError before anything trains."""
    from glmwb.pretrain.run import load_tokenizer

    if recipe.model.init_from and not (Path(recipe.model.init_from) / "config.json").is_file():
        raise ConfigError(
            f"model.init_from: no model folder at {recipe.model.init_from!r} (expected config.json there); "
            "run the pretrain stage first or point model.init_from at a GLM folder"
        )
    baseline = _baseline_folder(recipe)  # checked before training, so a wrong folder costs nothing
    tok_path = recipe.data.tokenizer or recipe.model.init_from
    if tok_path is None:
        raise ConfigError("data.tokenizer: needed when model.init_from is null")
    return baseline, load_tokenizer(tok_path)


def _load_pairs(recipe: RewardRecipe, tok, print) -> _Pairs:  # noqa: A002 (the rank's print)
    """Records → (reliability weights) → encoded pairs; with ``train.value_first`` the form pairs train the
    head and the others fit the value weights after."""
    from glmwb.rewards.data import annotator_reliability, encode_pairs, reliability_weights

    train_records, held_records, facts = load_records(recipe.data, recipe.run.seed)
    if recipe.data.max_train_pairs:
        train_records = train_records[: recipe.data.max_train_pairs]
    if recipe.data.max_eval_pairs:
        held_records = held_records[: recipe.data.max_eval_pairs]
    if recipe.loss.weights == "reliability":
        reliability = annotator_reliability(train_records)
        facts["reliability"] = reliability
        train_records = reliability_weights(train_records, reliability)
        print("annotator reliability: " + ", ".join(f"{k} {v:.2f}" for k, v in reliability.items()))
    heads, max_len, trunc = recipe.model.heads, recipe.data.max_length, recipe.data.truncation
    terminator = _terminator(recipe)
    train_pairs, train_stats = encode_pairs(tok, train_records, max_len, trunc, heads, "train", terminator)
    held_pairs, held_stats = encode_pairs(tok, held_records, max_len, trunc, heads, "held-out", terminator)
    print(f"data: train {json.dumps(train_stats)}; held-out {json.dumps(held_stats)}")
    data = _Pairs(train_records, held_records, facts, train_pairs, held_pairs, train_stats, held_stats)
    if recipe.train.value_first:  # form pairs train the head; the others fit the value weights after
        form_records, value_records = split_value_first(recipe, train_records)
        data.train_pairs, _ = encode_pairs(tok, form_records, max_len, trunc, heads, "train", terminator)
        data.value_pairs, _ = encode_pairs(tok, value_records, max_len, trunc, heads, "train", terminator)
        print(
            f"value first ({recipe.train.value_first}): {len(data.train_pairs)} pairs of equal "
            f"{recipe.train.value_first} train the head, {len(data.value_pairs)} others fit the value weights"
        )
    return data


def _terminator(recipe: RewardRecipe) -> str | None:
    return None if recipe.model.score_token == "none" else recipe.model.score_token


def _build_model_logged(recipe: RewardRecipe, tok, data: _Pairs, print):  # noqa: A002 (the rank's print)
    model = build_model(recipe, tok)
    heads = recipe.model.heads
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"reward model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
        f"({trainable / 1e6:.2f}M trainable{', LoRA' if recipe.model.lora.enabled else ''}), heads {list(heads)}"
    )
    model.info = replace(
        model.info, heads=list(heads), max_length=recipe.data.max_length, terminator=_terminator(recipe),
        extra={"data": data.facts},
    )  # fmt: skip
    return model


def _ensemble_members(recipe: RewardRecipe, tok, data: _Pairs, final: Path, summary, pad_id: int, print):  # noqa: A002
    """More members on the same pairs with other seeds (``model.ensemble`` or ``eval.ensemble``); with
    ``model.ensemble`` > 1, final/ becomes the ensemble. Returns the folders to evaluate (final/ first) and the
    budget record (all members' when final/ is the ensemble)."""
    from glmwb.pretrain.run_folder import Budget
    from glmwb.rewards.train import save_reward_folder, train_reward_model

    members, member_budgets = [final], [summary["budget"]]
    extra = recipe.model.ensemble - 1 or recipe.eval.ensemble  # members beyond the first, same data
    for i in range(1, extra + 1):  # same data and schedule, other seeds
        torch.manual_seed(recipe.run.seed + i)
        member = build_model(recipe, tok)  # a new head (and, from scratch, a new backbone) from this seed
        member_dir = Path(recipe.run.dir) / f"ensemble_{i}"
        print(f"ensemble member {i + 1} of {extra + 1} (seed {recipe.run.seed + i})")
        member_budgets.append(train_reward_model(
            member, tok, data.train_pairs, [], recipe.loss, recipe.optim, replace(recipe.train, resume=False),
            member_dir, pad_id, seed=recipe.run.seed + i, lora=recipe.model.lora.enabled, log=lambda s: None,
            value_pairs=data.value_pairs,
        )["budget"])  # fmt: skip
        members.append(save_reward_folder(member, member_dir / "final", tok))
    budget = Budget.from_dict(summary["budget"])
    if recipe.model.ensemble > 1:  # final/ becomes the ensemble: member 0 there, the others in final/members/
        from glmwb.rewards.ensemble import RewardEnsemble
        from glmwb.rewards.model import RewardModel
        from glmwb.rewards.train import reward_statistics

        ensemble = RewardEnsemble(
            [RewardModel.from_pretrained(m) for m in members], recipe.model.ensemble_penalty
        )
        reward_statistics(ensemble, data.train_pairs, pad_id, recipe.run.seed)
        ensemble.save(final, tok, member_folders=members[1:])
        for m in members[1:]:
            shutil.rmtree(m.parent, ignore_errors=True)  # now in final/members/
        members = [final]
        if len(member_budgets) > 1:  # final/ is the ensemble: all its members count
            budget = Budget.combine("reward", [Budget.from_dict(b) for b in member_budgets], "member")
    return members, budget


def _evaluate(recipe: RewardRecipe, final: Path, members, data: _Pairs, summary, budget, print) -> dict:  # noqa: A002
    """Held-out evaluation of final/ (and the members beside it) into eval/, and its lines on the console."""
    from glmwb.rewards.evaluate import evaluate_folder, format_summary, length_baseline_line

    run_dir = Path(recipe.run.dir)
    report = evaluate_folder(
        final,
        data.held_records,
        data.held_pairs,
        run_dir / "eval",
        members=members[1:],
        bins=recipe.eval.bins,
    )
    summary.update(
        data={"train": data.train_stats, "heldout": data.held_stats, **data.facts},
        eval=report,
        model=str(final),
    )
    line = format_summary(
        report["pairwise"] | {"calibration": report["calibration"], "length": report["length"]}
    )
    print(f"held-out: {line}")
    if report["pairwise"].get("accuracy") is not None and report["length_baseline"]["strict_pairs"]:
        print(f"  length: {length_baseline_line(report['length_baseline'])}")
    if "world" in report and report["world"].get("pairs"):
        w = report["world"]
        target = recipe.eval.target_fraction_of_ceiling
        w["target_fraction_of_ceiling"] = target
        w["meets_target"] = w["fraction_of_ceiling"] >= target
        lo, hi = w["fraction_of_ceiling_ci95"]
        print(
            f"world: held-out accuracy vs annotators {w['accuracy_vs_annotators']:.3f} on {w['pairs']} strict pairs; "
            f"their agreement ceiling {w['ceiling']:.3f} → {w['fraction_of_ceiling']:.1%} of ceiling "
            f"(95% CI {lo:.1%}–{hi:.1%}; target {target:.0%}: {'met' if w['meets_target'] else 'NOT met'}); "
            f"vs the noise-free rule {w['accuracy_vs_rule']:.3f}"
        )
    if budget.stopped_early:  # a figure from a cut-short run is not the recipe's figure: say so
        print(f"note: training {budget.line()}: the figures above are for that shorter run")
    ens = report.get("ensemble", {})
    if ens.get("member_accuracy"):
        members_line = ", ".join(f"{a:.3f}" for a in ens["member_accuracy"])
        print(
            f"ensemble of {ens['members']}: pairwise accuracy of the members {members_line}; the ensemble's above"
        )
        if ens.get("member_fraction_of_ceiling"):
            print(
                "  members vs annotators: "
                + ", ".join(f"{f:.1%}" for f in ens["member_fraction_of_ceiling"])
                + " of ceiling"
            )
    return report


def _write_records(recipe: RewardRecipe, final: Path, summary, budget, report) -> None:
    """summary.json, the model folder's run record, and the evaluation in final/'s reward config."""
    from glmwb.pretrain.run_folder import write_model_record, write_summary
    from glmwb.rewards.ensemble import ENSEMBLE_INFO, is_ensemble

    run_dir = Path(recipe.run.dir)
    write_summary(run_dir, summary, budget)
    write_model_record(final, budget, run_dir, recipe.model.init_from)
    info_path = final / (ENSEMBLE_INFO if is_ensemble(final) else "reward_config.json")
    info = json.loads(info_path.read_text())
    info["extra"]["eval"] = {k: report[k] for k in ("pairwise", "length_baseline", "world") if k in report}
    info_path.write_text(json.dumps(info, indent=2, ensure_ascii=False))


def _baseline_folder(recipe: RewardRecipe) -> str | None:
    """The causal-LM folder ``eval.likelihood_baseline`` names ("init": model.init_from; skipped, with a note,
    for a model trained from a random initialisation), or None."""
    folder = recipe.eval.likelihood_baseline
    if folder == "init":
        if not recipe.model.init_from:
            builtins.print("eval.likelihood_baseline: skipped (model.init_from is null: no LM to score with)")
            return None
        folder = recipe.model.init_from
    if folder is None:
        return None
    config = Path(folder) / "config.json"
    if not config.is_file() or "ForCausalLM" not in config.read_text():
        raise ConfigError(
            f"eval.likelihood_baseline: {folder!r} is not a causal-LM GLM folder (config.json with "
            "GlmForCausalLM); point it at a base or SFT folder, or set it to null"
        )
    return folder


def _likelihood_baseline(
    folder: str, max_length: int, held_records, report, run_dir: Path, print
) -> dict[str, Any]:
    """Score the held-out pairs by the causal LM's own log-likelihood (rewards.evaluate.likelihood_baseline),
    print it next to the RM's figures, and write eval/likelihood_baseline.json."""
    from glmwb.rewards.evaluate import likelihood_baseline

    base = likelihood_baseline(folder, held_records, max_length)
    rm_acc, lb_acc = report["pairwise"].get("accuracy"), base["pairwise"].get("accuracy")
    if lb_acc is None:  # every held-out pair is a tie: there is no accuracy to compare
        print(f"likelihood baseline (Σ log p(answer) under {folder}): no strict held-out pairs to score")
        return base
    line = f"likelihood baseline (Σ log p(answer) under {folder}): pairwise accuracy {lb_acc:.3f}"
    if rm_acc is not None:
        line += f" (the RM: {rm_acc:.3f}, {rm_acc - lb_acc:+.3f})"
    w = base.get("world", {})
    if w.get("pairs"):
        line += (
            f"; vs annotators {w['accuracy_vs_annotators']:.3f} → {w['fraction_of_ceiling']:.1%} of ceiling"
        )
    print(line)
    (run_dir / "eval" / "likelihood_baseline.json").write_text(json.dumps(base, indent=2, ensure_ascii=False))
    return base
