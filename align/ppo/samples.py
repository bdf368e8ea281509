"""The sample table: a few rollouts of a step, token by token, with the per-token KL to the reference (where the
policy drifted), the log-probs, the advantage, and the score with its terms.

Written to ``samples.jsonl`` (one row per response, machine-readable), ``samples.txt`` (fixed-width, for a
terminal) and ``samples.html`` (tokens shaded by KL: red = the policy likes the token more than the
reference did, blue = less).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any


def sample_rows(exp: Any, tokenizer: Any, step: int, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` responses of an ``Experience`` as dicts (tokens, per-token KL / log-probs / advantages)."""
    rows = []
    P = exp.prompt_width
    for i in range(min(n, exp.input_ids.shape[0])):
        length = int(exp.response_mask[i].sum())
        ids = exp.input_ids[i, P : P + length].tolist()
        item = exp.items[i]
        prompt = item.messages[-1]["content"] if item.messages else ""
        rows.append({
            "step": step,
            "prompt": prompt,
            "response": exp.texts[i],
            "terminated": bool(exp.terminated[i]),
            "score": round(float(exp.scores[i]), 4),
            "terms": {k: round(float(v), 4) for k, v in exp.breakdown[i].items()},
            "seq_kl": round(float(exp.kl[i, :length].sum()), 4),
            "tokens": [tokenizer.decode([t]) for t in ids],
            "kl": [round(float(x), 4) for x in exp.kl[i, :length]],
            "logprob": [round(float(x), 4) for x in exp.old_logprobs[i, :length]],
            "ref_logprob": [round(float(x), 4) for x in exp.ref_logprobs[i, :length]],
            "advantage": [round(float(x), 4) for x in exp.advantages[i, :length]],
            "gold": getattr(item.world_prompt, "gold", None),
        })  # fmt: skip
    return rows


def write_samples(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Append to samples.jsonl and samples.txt; rewrite samples.html from the whole jsonl."""
    run_dir = Path(run_dir)
    with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(run_dir / "samples.txt", "a", encoding="utf-8") as f:
        f.write(text_table(rows))
    all_rows = [
        json.loads(line) for line in (run_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    (run_dir / "samples.html").write_text(html_table(all_rows), encoding="utf-8")


def text_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        out.append(f"=== step {r['step']} | score {r['score']:+.3f} | KL {r['seq_kl']:+.3f} | "
                   f"{'ended' if r['terminated'] else 'UNTERMINATED'} | gold {r['gold']!r}")  # fmt: skip
        out.append(f"prompt:   {r['prompt']}")
        out.append(f"response: {r['response']}")
        out.append("terms:    " + ", ".join(f"{k} {v:+.3f}" for k, v in r["terms"].items()))
        out.append(f"  {'token':<16} {'kl':>8} {'logp':>8} {'ref':>8} {'adv':>8}")
        for tok, kl, lp, ref, adv in zip(
            r["tokens"], r["kl"], r["logprob"], r["ref_logprob"], r["advantage"], strict=True
        ):
            out.append(f"  {tok!r:<16} {kl:>+8.3f} {lp:>8.3f} {ref:>8.3f} {adv:>+8.3f}")
        out.append("")
    return "\n".join(out) + "\n"


def _shade(kl: float, scale: float = 2.0) -> str:
    a = min(1.0, abs(kl) / scale)
    return f"rgba(220,40,40,{a:.2f})" if kl > 0 else f"rgba(40,90,220,{a:.2f})"


def html_table(rows: list[dict[str, Any]]) -> str:
    """One table row per response; each token a span shaded by its KL (hover: kl / logp / ref / advantage)."""
    body = []
    for r in reversed(rows):  # newest first
        spans = "".join(
            f'<span style="background:{_shade(kl)}" title="kl {kl:+.3f} | logp {lp:.3f} | ref {ref:.3f} | adv {adv:+.3f}">'
            f"{html.escape(tok).replace(chr(10), '⏎')}</span>"
            for tok, kl, lp, ref, adv in zip(
                r["tokens"], r["kl"], r["logprob"], r["ref_logprob"], r["advantage"], strict=True
            )
        )
        terms = ", ".join(f"{k} {v:+.2f}" for k, v in r["terms"].items())
        body.append(
            f"<tr><td>{r['step']}</td><td>{html.escape(r['prompt'])}</td><td class=t>{spans}</td>"
            f"<td>{r['score']:+.3f}</td><td>{r['seq_kl']:+.3f}</td><td>{'yes' if r['terminated'] else 'NO'}</td>"
            f"<td>{html.escape(str(r['gold']))}</td><td>{html.escape(terms)}</td></tr>"
        )
    return (
        "<!doctype html><meta charset=utf-8><title>PPO samples</title><style>"
        "body{font:13px sans-serif} table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:4px;"
        "vertical-align:top} td.t{font-family:monospace;white-space:pre-wrap;max-width:40em}</style>"
        "<p>Tokens shaded by per-token KL log pi(a) - log pi_ref(a): red = more likely than under the reference, "
        "blue = less; hover a token for its numbers.</p><table><tr><th>step</th><th>prompt</th><th>response</th>"
        "<th>score</th><th>KL</th><th>ended</th><th>gold</th><th>terms</th></tr>" + "".join(body) + "</table>"
    )
