"""Inter-annotator agreement on nominal labels (A / B / tie / both_bad), and accuracy on gold items.

Plain functions over labels, no database and no UI imports:

- ``cohens_kappa(a, b)``: two raters on the same units. kappa = (p_o - p_e) / (1 - p_e), p_o the observed
  agreement, p_e = sum_k p_a(k) p_b(k) the agreement expected from each rater's own label frequencies
  (Cohen 1960).
- ``fleiss_kappa(table)``: units x categories counts. P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)),
  P = mean_i P_i, p_j = sum_i n_ij / sum_i n_i, P_e = sum_j p_j^2, kappa = (P - P_e) / (1 - P_e)
  (Fleiss 1971; with equal n_i this is exactly his statistic; units with n_i < 2 are dropped).
- ``krippendorff_alpha(units)``: nominal alpha with missing data. From the coincidence matrix
  o_ck = sum_u sum_{i != j} [v_ui = c][v_uj = k] / (m_u - 1) (pairable units only, m_u >= 2),
  n_c = sum_k o_ck, n = sum_c n_c: alpha = 1 - (n - 1) (n - sum_c o_cc) / (n^2 - sum_c n_c^2)
  (Krippendorff, "Computing Krippendorff's Alpha-Reliability", 2011).

Undefined statistics (one category only, nothing pairable) are NaN, shown as "n/a" with the reason
(``na_reason``). Kappa and alpha values carry Landis & Koch's (1977) reading (``reading``): below 0 poor
(worse than chance), up to 0.20 slight, 0.40 fair, 0.60 moderate, 0.80 substantial, above almost perfect.
For the admin's charts: ``votes_over_time`` (each annotator's running count) and ``agreement_curve``
(alpha and percent agreement over the first n votes, as votes accrue).

``agreement_report(votes)`` puts them together for the admin view and ``glmwb annotation report``: it takes
vote rows with ``item_id``, ``annotator``, ``choice`` and ``gold_choice`` attributes (``Store.votes()``).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

NAN = float("nan")


def cohens_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    if len(a) != len(b):
        raise ValueError(f"cohens_kappa: the raters labelled {len(a)} and {len(b)} units")
    n = len(a)
    if n == 0:
        return NAN
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return NAN if p_e == 1.0 else (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(table: Sequence[Sequence[int]]) -> float:
    rows = [list(r) for r in table if sum(r) >= 2]
    if not rows:
        return NAN
    total = sum(map(sum, rows))
    p_j = [sum(col) / total for col in zip(*rows, strict=True)]
    p_bar = sum((sum(x * x for x in r) - sum(r)) / (sum(r) * (sum(r) - 1)) for r in rows) / len(rows)
    p_e = sum(p * p for p in p_j)
    return NAN if p_e == 1.0 else (p_bar - p_e) / (1.0 - p_e)


def krippendorff_alpha(units: Iterable[Sequence[Hashable | None]]) -> float:
    """Nominal alpha; each unit is the list of values it received (None = missing)."""
    o: Counter[tuple[Hashable, Hashable]] = Counter()
    for unit in units:
        values = [v for v in unit if v is not None]
        m = len(values)
        if m < 2:
            continue
        counts = Counter(values)
        for c, k in itertools.product(counts, counts):
            pairs = counts[c] * (counts[k] - (c == k))  # ordered pairs of distinct raters
            if pairs:
                o[c, k] += pairs / (m - 1)
    n_c: Counter[Hashable] = Counter()
    for (c, _), v in o.items():
        n_c[c] += v
    n = sum(n_c.values())
    if n <= 1:
        return NAN
    expected = n * n - sum(v * v for v in n_c.values())
    if expected == 0:
        return NAN
    observed = n - sum(v for (c, k), v in o.items() if c == k)
    return 1.0 - (n - 1) * observed / expected


def label_table(units: Iterable[Sequence[Hashable]], categories: Sequence[Hashable]) -> list[list[int]]:
    """Units' label lists -> the units x categories count table ``fleiss_kappa`` takes."""
    index = {c: j for j, c in enumerate(categories)}
    table = []
    for unit in units:
        row = [0] * len(categories)
        for v in unit:
            row[index[v]] += 1
        table.append(row)
    return table


KAPPA_BANDS = ((0.0, "poor (worse than chance)"), (0.20, "slight"), (0.40, "fair"), (0.60, "moderate"),
               (0.80, "substantial"), (math.inf, "almost perfect"))  # fmt: skip


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def reading(x: float | None) -> str:
    """The usual reading of a kappa or alpha value (Landis & Koch 1977); "" for an undefined one."""
    if x is None or math.isnan(x):
        return ""
    return next(band for upper, band in KAPPA_BANDS if (x < upper if upper == 0.0 else x <= upper))


@dataclass
class AgreementReport:
    votes: int
    annotators: int
    items: int  # regular (non-gold) items with at least one vote
    items_multi: int  # ... with at least two votes: the ones agreement is measured on
    labels: dict[str, int]
    percent_agreement: float  # share of agreeing pairs of votes on the same item
    krippendorff_alpha: float
    fleiss_kappa: float
    cohen_kappa_mean: float  # mean over annotator pairs with at least `min_common` items in common
    cohen_pairs: list[dict[str, Any]] = field(default_factory=list)
    per_annotator: dict[str, dict[str, Any]] = field(default_factory=dict)
    min_common: int = 5  # items two annotators share before their Cohen's kappa counts

    def to_dict(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            if isinstance(x, float) and math.isnan(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        return clean(asdict(self))

    def na_reason(self, statistic: str) -> str:
        """Why a statistic of this report is undefined ("" when it is defined)."""
        value = getattr(self, statistic)
        if not math.isnan(value):
            return ""
        if self.votes == 0:
            return "no votes yet"
        if self.items_multi == 0:
            return "no item has two votes yet"
        if statistic == "cohen_kappa_mean":
            if not self.cohen_pairs:
                return f"no two annotators have {self.min_common} items in common yet"
            return "every pair's votes use one label only"
        return (
            "every vote has the same label: agreement by chance is complete, so there is nothing to measure"
        )

    def _cell(self, statistic: str, chance_corrected: bool = True) -> str:
        value = getattr(self, statistic)
        if math.isnan(value):
            return f"n/a | {self.na_reason(statistic)}"
        return f"{_fmt(value)} | {reading(value) if chance_corrected else 'share of agreeing pairs'}"

    def to_markdown(self) -> str:
        lines = [
            f"**{self.votes}** votes by **{self.annotators}** annotators on **{self.items}** items "
            f"({self.items_multi} with two or more votes).",
            "",
            "| statistic | value | reading |",
            "|---|---|---|",
            f"| Krippendorff's alpha (nominal) | {self._cell('krippendorff_alpha')} |",
            f"| Fleiss' kappa | {self._cell('fleiss_kappa')} |",
            f"| Cohen's kappa, mean over pairs ({len(self.cohen_pairs)}) | {self._cell('cohen_kappa_mean')} |",
            f"| pairwise percent agreement | {self._cell('percent_agreement', chance_corrected=False)} |",
            "",
            "Reading (Landis & Koch 1977): below 0 poor, to 0.20 slight, 0.40 fair, 0.60 moderate, 0.80 "
            "substantial, above that almost perfect; 1 = complete agreement, 0 = what chance alone gives.",
            "",
            "labels: " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())),
            "",
            "| annotator | votes | agrees with others' majority | gold items | gold accuracy |",
            "|---|---|---|---|---|",
        ]
        for name, row in sorted(self.per_annotator.items()):
            lines.append(
                f"| {name} | {row['votes']} | {_fmt(row['majority_agreement'], 2)} | "
                f"{row['gold_votes']} | {_fmt(row['gold_accuracy'], 2)} |"
            )
        return "\n".join(lines)


def agreement_report(votes: Sequence[Any], min_common: int = 5) -> AgreementReport:
    """Agreement over regular items, gold accuracy per annotator (see the module docstring)."""
    by_item: dict[int, dict[str, str]] = defaultdict(dict)
    per: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"votes": 0, "gold_votes": 0, "gold_correct": 0, "majority_n": 0, "majority_hits": 0}
    )
    labels: Counter[str] = Counter()
    for v in votes:
        per[v.annotator]["votes"] += 1
        if v.gold_choice is not None:
            per[v.annotator]["gold_votes"] += 1
            per[v.annotator]["gold_correct"] += int(v.choice == v.gold_choice)
            continue
        labels[v.choice] += 1
        by_item[v.item_id][v.annotator] = v.choice  # one active vote per (item, annotator)

    units = [list(d.values()) for d in by_item.values()]
    multi = [u for u in units if len(u) >= 2]
    categories = sorted({c for u in units for c in u})
    agree_pairs = sum(sum(c * (c - 1) for c in Counter(u).values()) for u in multi)
    all_pairs = sum(len(u) * (len(u) - 1) for u in multi)

    # Leave-one-out: does each vote agree with the plurality of the others on its item (a strict plurality)?
    for labels_of in by_item.values():
        for name, choice in labels_of.items():
            others = Counter(c for n, c in labels_of.items() if n != name).most_common(2)
            if not others or (len(others) == 2 and others[0][1] == others[1][1]):
                continue
            per[name]["majority_n"] += 1
            per[name]["majority_hits"] += int(choice == others[0][0])

    pairs = []
    names = sorted({n for d in by_item.values() for n in d})
    for x, y in itertools.combinations(names, 2):
        common = [d for d in by_item.values() if x in d and y in d]
        if len(common) >= min_common:
            k = cohens_kappa([d[x] for d in common], [d[y] for d in common])
            pairs.append({"a": x, "b": y, "items": len(common), "kappa": k})
    finite = [p["kappa"] for p in pairs if not math.isnan(p["kappa"])]

    per_annotator = {
        name: {
            "votes": row["votes"],
            "gold_votes": row["gold_votes"],
            "gold_accuracy": row["gold_correct"] / row["gold_votes"] if row["gold_votes"] else NAN,
            "majority_agreement": row["majority_hits"] / row["majority_n"] if row["majority_n"] else NAN,
        }
        for name, row in per.items()
    }
    return AgreementReport(
        votes=len(votes),
        annotators=len(per),
        items=len(units),
        items_multi=len(multi),
        labels=dict(labels),
        percent_agreement=agree_pairs / all_pairs if all_pairs else NAN,
        krippendorff_alpha=krippendorff_alpha(multi),
        fleiss_kappa=fleiss_kappa(label_table(multi, categories)) if multi else NAN,
        cohen_kappa_mean=sum(finite) / len(finite) if finite else NAN,
        cohen_pairs=pairs,
        per_annotator=per_annotator,
        min_common=min_common,
    )


def gold_accuracy(votes: Sequence[Any]) -> Mapping[str, float]:
    """Per annotator: the share of their votes on gold items that match the gold answer."""
    report = agreement_report(votes)
    return {n: r["gold_accuracy"] for n, r in report.per_annotator.items() if r["gold_votes"]}


def votes_over_time(votes: Sequence[Any]) -> dict[str, list[tuple[datetime, int]]]:
    """Each annotator's running count of votes at each of their votes' times (``created_at``)."""
    out: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    for v in sorted(votes, key=lambda v: (v.created_at, v.vote_id)):
        out[v.annotator].append((v.created_at, len(out[v.annotator]) + 1))
    return dict(out)


def agreement_curve(votes: Sequence[Any], points: int = 30) -> list[tuple[int, float, float]]:
    """(n, Krippendorff's alpha, percent agreement) over the first n votes in time order, at up to
    ``points`` evenly spaced n; NaN where undefined (no item with two votes yet)."""
    ordered = sorted(votes, key=lambda v: (v.created_at, v.vote_id))
    if not ordered:
        return []
    step = max(1, math.ceil(len(ordered) / points))
    ns = sorted({*range(step, len(ordered) + 1, step), len(ordered)})
    out = []
    for n in ns:
        r = agreement_report(ordered[:n], min_common=10**9)  # pairs' kappas are not needed here
        out.append((n, r.krippendorff_alpha, r.percent_agreement))
    return out
