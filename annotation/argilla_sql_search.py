"""A search engine for argilla-server that reads the server's own SQL database (no Elasticsearch/OpenSearch).

This module runs inside argilla-server's virtual environment (`glmwb argilla-server` creates it), not in the
workbench's: it imports only argilla_server and its dependencies (never glmwb, torch or the store). Run as a
script it registers the engine under the name ``sql`` in argilla-server's ``SearchEngine`` registry and then
runs argilla-server's own command line (``start``, ``database migrate``, ``database users create``, ...), so
``ARGILLA_SEARCH_ENGINE=sql`` selects it.

Every record, response and suggestion already lives in argilla-server's database (SQLite or PostgreSQL); an
index would only be a copy. So the indexing calls are no-ops and each query loads the dataset's records with
their responses and suggestions, then filters, scores and sorts them in Python with the semantics of
argilla-server's Elasticsearch engine (search_engine/commons.py): per-user response-status filters (pending =
no response by that user), response/suggestion/metadata/record terms and range filters, text search over the
fields (all words, case-insensitive; chat fields by message content), sorting with missing values last,
dataset and per-user progress, metadata metrics and cosine similarity search. Each query reads the whole
dataset: meant for one machine and one team's datasets, not for a large deployment (use Elasticsearch there).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from uuid import UUID

from argilla_server.enums import MetadataPropertyType, SimilarityOrder, SortOrder
from argilla_server.models import (
    Dataset,
    MetadataProperty,
    Question,
    Record,
    Response,
    Suggestion,
    User,
    VectorSettings,
)
from argilla_server.search_engine.base import (
    AndFilter,
    Filter,
    FilterScope,
    FloatMetadataMetrics,
    IntegerMetadataMetrics,
    MetadataFilterScope,
    MetadataMetrics,
    Order,
    RangeFilter,
    RecordFilterScope,
    ResponseFilterScope,
    SearchEngine,
    SearchResponseItem,
    SearchResponses,
    SuggestionFilterScope,
    TermsFilter,
    TermsMetrics,
    TextQuery,
)
from sqlalchemy import select
from sqlalchemy.orm import selectinload

ENGINE_NAME = "sql"
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclasses.dataclass
class Doc:
    """One record as the engine sees it (what Elasticsearch would hold in its index)."""

    id: UUID
    external_id: str | None
    status: str
    inserted_at: Any
    updated_at: Any
    fields: dict
    metadata: dict
    responses: list  # [{"user_id": str, "status": str, "values": {question: value}}]
    suggestions: dict  # {question: {"value": ..., "score": ..., "agent": ..., "type": ...}}
    vectors: dict  # {vector_settings_id: [float]}


def _session():
    from argilla_server.database import AsyncSessionLocal

    return AsyncSessionLocal()


async def load_docs(dataset_id: UUID) -> list[Doc]:
    """All records of a dataset, in insertion order, with responses, suggestions and vectors."""
    async with _session() as db:
        names = dict(
            (
                await db.execute(select(Question.id, Question.name).where(Question.dataset_id == dataset_id))
            ).all()
        )
        rows = await db.execute(
            select(Record)
            .where(Record.dataset_id == dataset_id)
            .options(
                selectinload(Record.responses), selectinload(Record.suggestions), selectinload(Record.vectors)
            )
            .order_by(Record.inserted_at, Record.id)
        )
        return [_doc(record, names) for record in rows.scalars().all()]


def _doc(record: Record, question_names: dict) -> Doc:
    responses = [
        {
            "user_id": str(r.user_id),
            "status": str(r.status.value if hasattr(r.status, "value") else r.status),
            "values": {q: (v or {}).get("value") for q, v in (r.values or {}).items()},
        }
        for r in record.responses
    ]
    suggestions = {
        question_names.get(s.question_id, str(s.question_id)): {
            "value": s.value,
            "score": s.score,
            "agent": s.agent,
            "type": str(s.type.value) if s.type is not None and hasattr(s.type, "value") else s.type,
        }
        for s in record.suggestions
    }
    status = record.status.value if hasattr(record.status, "value") else record.status
    return Doc(
        id=record.id,
        external_id=record.external_id,
        status=str(status),
        inserted_at=record.inserted_at,
        updated_at=record.updated_at,
        fields=record.fields or {},
        metadata=record.metadata_ or {},
        responses=responses,
        suggestions=suggestions,
        vectors={v.vector_settings_id: v.value for v in record.vectors},
    )


# ----------------------------------------------------------------------------------------------- matching
def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _flatten(value: Any) -> list:
    """Scalar values of a response or suggestion value (rankings: their values; spans: their labels)."""
    out = []
    for v in _as_list(value):
        if isinstance(v, dict):
            out.extend(x for k, x in v.items() if k in ("value", "label", "rank"))
        else:
            out.append(v)
    return out


def _terms_match(values: list, wanted: Iterable[str]) -> bool:
    wanted = {str(w) for w in wanted}
    return any(str(v) in wanted for v in values)


def _comparable(value: Any, bound: Any) -> tuple[Any, Any] | None:
    """(value, bound) as two numbers, or two datetimes (record timestamps against ISO strings), or None."""
    if isinstance(value, datetime):
        try:
            b = (
                bound
                if isinstance(bound, datetime)
                else datetime.fromisoformat(str(bound).replace("Z", "+00:00"))
            )
        except ValueError:
            return None
        if (value.tzinfo is None) != (b.tzinfo is None):
            value, b = value.replace(tzinfo=None), b.replace(tzinfo=None)
        return value, b
    try:
        return float(value), float(bound)
    except (TypeError, ValueError):
        return None


def _range_match(values: list, ge: Any, le: Any) -> bool:
    for v in values:
        low = ge is None or ((pair := _comparable(v, ge)) is not None and pair[0] >= pair[1])
        high = le is None or ((pair := _comparable(v, le)) is not None and pair[0] <= pair[1])
        if low and high:
            return True
    return False


def _user_responses(doc: Doc, user: User | None) -> list:
    if user is None:
        return doc.responses
    return [r for r in doc.responses if r["user_id"] == str(user.id)]


def _scope_values(doc: Doc, scope: FilterScope) -> list:
    """The values a filter or sort on this scope compares (Elasticsearch's field values for the record)."""
    if isinstance(scope, MetadataFilterScope):
        return _as_list(doc.metadata.get(scope.metadata_property))
    if isinstance(scope, SuggestionFilterScope):
        suggestion = doc.suggestions.get(scope.question)
        return _flatten(suggestion.get(scope.property)) if suggestion else []
    if isinstance(scope, RecordFilterScope):
        return _as_list(getattr(doc, scope.property, None))
    if isinstance(scope, ResponseFilterScope):
        key = scope.question or scope.property
        responses = _user_responses(doc, scope.user)
        if scope.question:
            return [x for r in responses for x in _flatten(r["values"].get(key))]
        return [r.get(key) for r in responses if r.get(key) is not None]
    raise ValueError(f"Cannot process request for search scope {scope}")


def _status_filter_match(doc: Doc, flt: TermsFilter) -> bool:
    responses = _user_responses(doc, flt.scope.user)
    wanted = {str(v) for v in flt.values}
    if "pending" in wanted and not responses:
        return True
    return any(r["status"] in wanted for r in responses)


def matches(doc: Doc, flt: Filter | None) -> bool:
    if flt is None:
        return True
    if isinstance(flt, AndFilter):
        return all(matches(doc, f) for f in flt.filters)
    scope = flt.scope
    if isinstance(scope, ResponseFilterScope) and not scope.question:
        if scope.property != "status" or not isinstance(flt, TermsFilter):
            raise ValueError(f"Cannot process filter scope {scope}")
        return _status_filter_match(doc, flt)
    values = _scope_values(doc, scope)
    if isinstance(flt, TermsFilter):
        return _terms_match(values, flt.values)
    if isinstance(flt, RangeFilter):
        return _range_match(values, flt.ge, flt.le)
    raise ValueError(f"Cannot process request for filter {flt}")


def _field_text(value: Any) -> str:
    if isinstance(value, list):  # a chat field: [{"role": ..., "content": ...}]
        return " ".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    if isinstance(value, dict):
        return " ".join(_field_text(v) for v in value.values())
    return "" if value is None else str(value)


def text_score(doc: Doc, query: TextQuery | str | None) -> float | None:
    """None when the record does not match; else how often the query's words occur (all must occur)."""
    if query is None:
        return 1.0
    if isinstance(query, str):
        query = TextQuery(q=query)
    words = [w.lower() for w in _WORD.findall(query.q)]
    source = [doc.fields.get(query.field)] if query.field else list(doc.fields.values())
    counts = Counter(w.lower() for value in source for w in _WORD.findall(_field_text(value)))
    if not words or any(counts[w] == 0 for w in words):
        return None
    return float(sum(counts[w] for w in words))


def _sort_key(doc: Doc, order: Order):
    values = _scope_values(doc, order.scope)
    if isinstance(order.scope, ResponseFilterScope) and values:
        numbers = [float(v) for v in values if isinstance(v, (int, float))]
        values = [sum(numbers) / len(numbers)] if numbers else values
    value = min(values) if order.order == SortOrder.asc and values else (max(values) if values else None)
    return value


def sort_docs(docs: list, sort: list[Order] | None) -> list:
    """Stable multi-key sort; a record without a value goes last in either direction (as in Elasticsearch)."""
    for order in reversed(sort or []):
        present = [d for d in docs if _sort_key(d, order) is not None]
        missing = [d for d in docs if _sort_key(d, order) is None]
        present.sort(key=lambda d: _sort_key(d, order), reverse=order.order == SortOrder.desc)
        docs = present + missing
    return docs


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


# ----------------------------------------------------------------------------------------------- engine
@SearchEngine.register(engine_name=ENGINE_NAME)
class SQLSearchEngine(SearchEngine):
    """argilla-server's SearchEngine over its own database; see the module docstring."""

    @classmethod
    async def new_instance(cls) -> SQLSearchEngine:
        return cls()

    async def close(self):
        pass

    async def ping(self) -> bool:
        return True

    async def info(self) -> dict:
        return {"distribution": ENGINE_NAME, "number": "1"}

    # The data is the database's own: nothing to index, update or delete.
    async def create_index(self, dataset: Dataset):
        pass

    async def delete_index(self, dataset: Dataset):
        pass

    async def configure_metadata_property(self, dataset: Dataset, metadata_property: MetadataProperty):
        pass

    async def configure_index_vectors(self, vector_settings: VectorSettings):
        pass

    async def index_records(self, dataset: Dataset, records: Iterable[Record]):
        pass

    async def partial_record_update(self, record: Record, **update):
        pass

    async def delete_records(self, dataset: Dataset, records: Iterable[Record]):
        pass

    async def update_record_response(self, response: Response):
        pass

    async def delete_record_response(self, response: Response):
        pass

    async def update_record_suggestion(self, suggestion: Suggestion):
        pass

    async def delete_record_suggestion(self, suggestion: Suggestion):
        pass

    async def get_dataset_progress(self, dataset: Dataset) -> dict:
        if dataset.is_draft:
            return {}
        docs = await load_docs(dataset.id)
        return {"total": len(docs), **Counter(d.status for d in docs)}

    async def get_dataset_user_progress(self, dataset: Dataset, user: User) -> dict:
        if dataset.is_draft:
            return {}
        docs = await load_docs(dataset.id)
        statuses = [r["status"] for d in docs for r in d.responses if r["user_id"] == str(user.id)]
        return {"total": len(statuses), **Counter(statuses)}

    async def search(
        self,
        dataset: Dataset,
        query: TextQuery | str | None = None,
        filter: Filter | None = None,
        sort: list[Order] | None = None,
        offset: int = 0,
        limit: int = 100,
        user_id: str | None = None,
    ) -> SearchResponses:
        if isinstance(query, TextQuery) and query.field and dataset.field_by_name(query.field) is None:
            raise Exception(f"Field {query.field} not found in dataset {dataset.id}")
        scored = []
        for doc in await load_docs(dataset.id):
            score = text_score(doc, query)
            if score is not None and matches(doc, filter):
                scored.append((doc, score))
        if not sort and query is not None:  # relevance first, as Elasticsearch orders by _score
            scored.sort(key=lambda pair: -pair[1])
        scores = {d.id: s for d, s in scored}
        docs = sort_docs([d for d, _ in scored], sort)
        items = [
            SearchResponseItem(record_id=d.id, score=scores[d.id]) for d in docs[offset : offset + limit]
        ]
        return SearchResponses(items=items, total=len(docs))

    async def compute_metrics_for(self, metadata_property: MetadataProperty) -> MetadataMetrics:
        docs = await load_docs(metadata_property.dataset_id)
        values = [v for d in docs for v in _as_list(d.metadata.get(metadata_property.name))]
        if metadata_property.type == MetadataPropertyType.terms:
            counts = Counter(str(v) for v in values)
            terms = [TermsMetrics.TermCount(term=t, count=c) for t, c in counts.most_common()]
            return TermsMetrics(total=len(values), values=terms)
        cls = (
            IntegerMetadataMetrics
            if metadata_property.type == MetadataPropertyType.integer
            else FloatMetadataMetrics
        )
        return cls(min=min(values) if values else None, max=max(values) if values else None)

    async def similarity_search(
        self,
        dataset: Dataset,
        vector_settings: VectorSettings,
        value: list[float] | None = None,
        record: Record | None = None,
        query: TextQuery | str | None = None,
        filter: Filter | None = None,
        max_results: int = 100,
        order: SimilarityOrder = SimilarityOrder.most_similar,
        threshold: float | None = None,
    ) -> SearchResponses:
        if bool(value) == bool(record):
            raise ValueError("Must provide either vector value or record to compute the similarity search")
        target = value or record.vector_value_by_vector_settings(vector_settings)
        if not target:
            raise ValueError("Cannot find a vector value to apply with provided info")
        sign = -1.0 if order == SimilarityOrder.least_similar else 1.0
        hits = []
        for doc in await load_docs(dataset.id):
            vector = doc.vectors.get(vector_settings.id)
            if vector is None or (record is not None and doc.id == record.id):
                continue
            if text_score(doc, query) is None or not matches(doc, filter):
                continue
            score = sign * _cosine(target, vector)
            if threshold is None or score >= threshold:
                hits.append(SearchResponseItem(record_id=doc.id, score=score))
        hits.sort(key=lambda item: -item.score)
        return SearchResponses(items=hits[:max_results], total=len(hits[:max_results]))


def main(argv: list[str] | None = None) -> None:
    """argilla-server's command line with this engine registered (``python argilla_sql_search.py start``).
    ``prepare USER-OPTIONS``: ``database migrate`` then ``database users create USER-OPTIONS`` (a user that
    exists already is kept), in one process."""
    from argilla_server.cli import app

    args = list(argv if argv is not None else sys.argv[1:])
    if args[:1] == ["prepare"]:
        app(["database", "migrate"], standalone_mode=False)
        app(["database", "users", "create", *args[1:]], standalone_mode=False)
        return
    sys.argv = [sys.argv[0], *args]
    app()


if __name__ == "__main__":
    main()
