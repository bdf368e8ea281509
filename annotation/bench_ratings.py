"""Benchmark: a Bradley–Terry fit with 1,000 bootstrap rounds on 100,000 synthetic votes among 20 models,
side by side with FastChat's ``elo_analysis`` methods on the same votes, in the same run.

    python -m glmwb.annotation.bench_ratings [--votes 100000] [--models 20] [--rounds 1000]
        [--fastchat-rounds 1000] [--json OUT]

Methods timed (each from its own input: ``Battle`` records for ours, a pandas DataFrame for FastChat's):

- ``glmwb fit_bt``: ``annotation.ratings.fit_bt`` as the leaderboard runs it (Davidson ties, "both bad"
  apart, position bias, robust intervals, 1,000 bootstrap rounds), and once more with FastChat's tie rule
  (ties="none", no position term) so that its ratings can be compared with FastChat's.
- ``FastChat MLE (logistic regression)``: the method of FastChat's ``compute_mle_elo`` and the Chatbot
  Arena notebook, re-implemented here from its description: every battle duplicated, a design matrix of
  +-ln 10 columns, a win as two wins and a tie as one win and one loss, an unpenalised logistic regression
  without intercept (scikit-learn's default L-BFGS: mean log-loss, gtol 1e-8, at most 100 iterations,
  run here with scipy's L-BFGS-B, which scikit-learn calls), and a bootstrap that resamples the battles
  (``battles.sample(frac=1.0, replace=True)``) and refits, one round after another.
- ``FastChat MLE (unique outcomes, process pool)``: the newer ``get_bootstrap_result_elo_mle_with_tie``:
  battles collapsed to distinct (model_a, model_b, outcome) rows with counts, bootstrap weights drawn
  multinomially, one L-BFGS-B fit per round (gtol 1e-6, at most 100 iterations) spread over a process pool
  of ``os.cpu_count()`` workers.

``--fastchat-rounds`` below ``--rounds`` times fewer FastChat rounds and scales them up (marked
"extrapolated" in the output).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from functools import partial
from pathlib import Path

import numpy as np

from glmwb.annotation.ratings import Battle, fit_bt


def synthetic_votes(
    n: int, m: int, seed: int = 0
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Davidson battles with known strengths: names, true strengths (logits), model_a, model_b, winner code
    (0 A, 1 B, 2 tie, 3 both bad); pairs uniform, sides random, ties about 20 %, a third of them both bad."""
    rng = np.random.default_rng(seed)
    names = [f"model-{i:02d}" for i in range(m)]
    theta = np.sort(rng.normal(0.0, 0.8, m))[::-1]
    a = rng.integers(0, m, n)
    b = (a + rng.integers(1, m, n)) % m
    d = theta[a] - theta[b]
    nu = 0.6
    z = np.exp(d / 2) + np.exp(-d / 2) + nu
    pa, pt = np.exp(d / 2) / z, nu / z
    u = rng.random(n)
    code = np.where(u < pa, 0, np.where(u < pa + pt, np.where(rng.random(n) < 1 / 3, 3, 2), 1))
    return names, theta, a, b, code


WINNER = ("model_a", "model_b", "tie", "tie (bothbad)")


# ---------------------------------------------------------------------------------------------------------
# FastChat's methods, re-implemented from their description (see the module docstring).
# ---------------------------------------------------------------------------------------------------------


def _lbfgs_logistic(X: np.ndarray, Y: np.ndarray, tol: float = 1e-8, max_iter: int = 100) -> np.ndarray:
    """Unpenalised logistic regression without intercept, as scikit-learn's lbfgs solver runs it."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    n = len(Y)
    sign = 2.0 * Y - 1.0

    def loss_grad(w):
        z = X @ w
        loss = -log_expit(sign * z).sum() / n
        grad = X.T @ (expit(z) - Y) / n
        return loss, grad

    res = minimize(loss_grad, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps})  # fmt: skip
    return res.x


def fastchat_mle_elo(df, scale: float = 400.0, base: float = 10.0, init: float = 1000.0):
    """FastChat's compute_mle_elo: duplicated battles, a tie = one win + one loss, logistic regression."""
    import pandas as pd

    models = pd.concat([df["model_a"], df["model_b"]]).unique()
    models = pd.Series(np.arange(len(models)), index=models)
    df = pd.concat([df, df], ignore_index=True)
    p, n = len(models.index), df.shape[0]
    X = np.zeros([n, p])
    X[np.arange(n), models[df["model_a"]]] = +math.log(base)
    X[np.arange(n), models[df["model_b"]]] = -math.log(base)
    Y = np.zeros(n)
    Y[df["winner"] == "model_a"] = 1.0
    tie_idx = ((df["winner"] == "tie") | (df["winner"] == "tie (bothbad)")).to_numpy().copy()
    tie_idx[len(tie_idx) // 2 :] = False
    Y[tie_idx] = 1.0
    coef = _lbfgs_logistic(X, Y)
    return pd.Series(scale * coef + init, index=models.index).sort_values(ascending=False)


def fastchat_bootstrap_lr(df, rounds: int, seed: int = 42):
    """FastChat's get_bootstrap_result with compute_mle_elo: resample the battles, refit, each round."""
    import pandas as pd

    np.random.seed(seed)
    rows = [fastchat_mle_elo(df.sample(frac=1.0, replace=True)) for _ in range(rounds)]
    out = pd.DataFrame(rows)
    return out[out.median().sort_values(ascending=False).index]


def _unique_outcomes(df):
    models = sorted(set(df["model_a"]) | set(df["model_b"]))
    index = {m: i for i, m in enumerate(models)}
    schedule = np.empty((len(df), 3), dtype=np.int32)
    schedule[:, 0] = df["model_a"].map(index).to_numpy()
    schedule[:, 1] = df["model_b"].map(index).to_numpy()
    schedule[:, 2] = np.select([df["winner"] == "model_a", df["winner"] == "model_b"], [2, 0], default=1)
    rows, counts = np.unique(schedule, return_counts=True, axis=0)
    return rows[:, :2], rows[:, 2].astype(np.float64) / 2.0, counts.astype(np.float64), models


def _bt_loss_grad(r, matchups, outcomes, weights, alpha):
    from scipy.special import expit

    logits = alpha * (r[matchups[:, 0]] - r[matchups[:, 1]])
    probs = expit(logits)
    loss = -((np.log(probs) * outcomes + np.log(1.0 - probs) * (1.0 - outcomes)) * weights).sum()
    g_row = -alpha * (outcomes - probs) * weights
    grad = np.zeros_like(r)
    np.add.at(grad, matchups[:, 0], g_row)
    np.add.at(grad, matchups[:, 1], -g_row)
    return loss, grad


def _bt_fit(matchups, outcomes, weights, n_models, alpha, tol=1e-6):
    from scipy.optimize import minimize

    res = minimize(_bt_loss_grad, np.zeros(n_models), args=(matchups, outcomes, weights, alpha), jac=True,
                   method="L-BFGS-B", options={"maxiter": 100, "gtol": tol})  # fmt: skip
    return res.x


def fastchat_bootstrap_pool(df, rounds: int, seed: int = 42):
    """FastChat's get_bootstrap_result_elo_mle_with_tie: multinomial weights over distinct outcomes, one
    L-BFGS-B fit per round in a process pool of os.cpu_count() workers."""
    import multiprocessing as mp

    np.random.seed(seed)
    matchups, outcomes, weights, models = _unique_outcomes(df)
    n = len(df)
    idxs = np.random.multinomial(n=n, pvals=weights / weights.sum(), size=rounds)
    boot_weights = idxs.astype(np.float64) / n
    fn = partial(_bt_fit, matchups, outcomes, n_models=len(models), alpha=math.log(10.0))
    with mp.get_context("fork").Pool(os.cpu_count()) as pool:
        results = pool.map(fn, boot_weights)
    full = _bt_fit(matchups, outcomes, weights, len(models), math.log(10.0))
    return models, 400.0 * np.array(results) + 1000.0, 400.0 * full + 1000.0


# ---------------------------------------------------------------------------------------------------------


def _machine() -> dict[str, object]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    import scipy

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip


def _cpu() -> float:
    """CPU seconds of this process and its finished children (FastChat's pool)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _centre(x: np.ndarray) -> np.ndarray:
    return x - x.mean()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m glmwb.annotation.bench_ratings", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--votes", type=int, default=100_000)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--fastchat-rounds", type=int, default=None, help="FastChat LR rounds actually run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results as JSON")
    args = ap.parse_args(argv)
    import pandas as pd

    names, theta, a, b, code = synthetic_votes(args.votes, args.models, args.seed)
    battles = [Battle(names[i], names[j], WINNER[c]) for i, j, c in zip(a, b, code, strict=True)]
    df = pd.DataFrame({"model_a": [names[i] for i in a], "model_b": [names[j] for j in b],
                       "winner": [WINNER[c] for c in code]})  # fmt: skip
    machine = _machine()
    # warm-up (imports, first calls) outside the timings
    fit_bt(battles[:2000], bootstrap=5)
    fastchat_mle_elo(df.iloc[:2000])
    _bt_fit(*_unique_outcomes(df.iloc[:2000])[:3], n_models=args.models, alpha=math.log(10.0))
    machine["load_average_at_start"] = os.getloadavg()
    print(f"{args.votes} votes among {args.models} models, {args.rounds} bootstrap rounds; "
          f"{machine['cpu']}, {machine['cores']} cores, numpy {machine['numpy']}, scipy {machine['scipy']}")  # fmt: skip
    results = []

    def record(name, clock, rounds_run, ratings, note="", scale=1.0):
        """clock: the (wall, cpu) seconds at the start; scale: extrapolation factor to --rounds."""
        wall, cpu = (time.perf_counter() - clock[0]) * scale, (_cpu() - clock[1]) * scale
        results.append({"method": name, "seconds": wall, "cpu_seconds": cpu, "rounds_run": rounds_run,
                        "note": note, "ratings": None if ratings is None else [float(x) for x in ratings]})  # fmt: skip
        print(
            f"  {name:<54} {wall:8.2f} s wall {cpu:8.2f} s CPU  ({rounds_run} rounds run){note}", flush=True
        )

    clock = (time.perf_counter(), _cpu())
    lb = fit_bt(battles, bootstrap=args.rounds, seed=args.seed)
    record(
        "glmwb fit_bt (Davidson ties, position bias)", clock, args.rounds, [lb.row(n).rating for n in names]
    )
    clock = (time.perf_counter(), _cpu())
    lb_none = fit_bt(battles, bootstrap=args.rounds, ties="none", position_bias=False, seed=args.seed)
    ours_none = np.array([lb_none.row(n).rating for n in names])
    record("glmwb fit_bt (ties as half a win, as FastChat)", clock, args.rounds, ours_none)

    clock = (time.perf_counter(), _cpu())
    models, boot, full = fastchat_bootstrap_pool(df, args.rounds)
    pool_ratings = np.array([full[models.index(n)] for n in names])
    record(f"FastChat MLE (unique outcomes, pool of {os.cpu_count()})", clock, args.rounds, pool_ratings)

    fc_rounds = args.rounds if args.fastchat_rounds is None else min(args.fastchat_rounds, args.rounds)
    clock = (time.perf_counter(), _cpu())
    point = fastchat_mle_elo(df)
    boot_lr = fastchat_bootstrap_lr(df, fc_rounds)
    lr_ratings = np.array([point[n] for n in names])
    note, scale = "", 1.0
    if fc_rounds < args.rounds:
        scale = (args.rounds + 1) / (fc_rounds + 1)
        note = f"  [extrapolated from the point fit and {fc_rounds} rounds]"
    record("FastChat MLE (logistic regression, resampled battles)", clock, fc_rounds, lr_ratings, note, scale)

    # agreement of the point estimates (centred: the methods anchor differently)
    diff_lr = float(np.abs(_centre(ours_none) - _centre(lr_ratings)).max())
    diff_pool = float(np.abs(_centre(ours_none) - _centre(pool_ratings)).max())
    se_lr = boot_lr[names].std().to_numpy()
    se_ours = np.array(
        [(lb_none.row(n).bootstrap.upper - lb_none.row(n).bootstrap.lower) / (2 * 1.96) for n in names]
    )
    print(f"point estimates, ties as half a win: largest difference to FastChat LR {diff_lr:.3f} points, "
          f"to FastChat pool {diff_pool:.3f} points")  # fmt: skip
    print(
        f"bootstrap spread (s.d., points): ours {se_ours.mean():.2f}, FastChat LR {se_lr.mean():.2f} (mean over models)"
    )
    from scipy.stats import spearmanr

    rho = spearmanr([lb.row(n).rating for n in names], theta).statistic
    print(f"fit_bt against the true strengths: Spearman {rho:.4f}")
    base = results[0]
    for r in results[2:]:
        print(f"  fit_bt (Davidson) is {r['seconds'] / base['seconds']:.1f}x faster in wall time, "
              f"{r['cpu_seconds'] / base['cpu_seconds']:.1f}x in CPU time than {r['method']}")  # fmt: skip
    machine["load_average_at_end"] = os.getloadavg()
    print(
        f"load average: {machine['load_average_at_start'][0]:.1f} at the start, {machine['load_average_at_end'][0]:.1f} at the end"
    )
    if args.json:
        out = {"machine": machine, "args": vars(args), "results": results, "max_diff_points_vs_lr": diff_lr,
               "max_diff_points_vs_pool": diff_pool}  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
