"""The model registry: every retrained model, the champion per dataset and model, each promotion decision.

Why SQLite in the data root: small, written by one retrain at a time, committed atomically (a killed writer leaves the
last committed state), no server. It also keeps the last retrain's source states. A model's key is its ``train``
artifact key: the same training on the same snapshot is registered once."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sand.pipeline.base.errors import ConfigError

REGISTRY_FILE = Path("registry") / "models.sqlite"
_SCHEMA = """CREATE TABLE IF NOT EXISTS models (
    key TEXT PRIMARY KEY, dataset TEXT NOT NULL, model TEXT NOT NULL, snapshot TEXT NOT NULL,
    artifacts TEXT NOT NULL, config TEXT NOT NULL, metrics TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS champions (
    dataset TEXT NOT NULL, model TEXT NOT NULL, key TEXT NOT NULL REFERENCES models(key), since TEXT NOT NULL,
    PRIMARY KEY (dataset, model));
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, dataset TEXT NOT NULL, model TEXT NOT NULL, challenger TEXT NOT NULL,
    champion TEXT, promoted INTEGER NOT NULL, details TEXT NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    dataset TEXT NOT NULL, model TEXT NOT NULL, states TEXT NOT NULL, at TEXT NOT NULL, PRIMARY KEY (dataset, model));
"""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Record:
    """A dataclass that reads back as plain JSON values (``--json`` output, Prefect results)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass


@dataclass(frozen=True)
class ModelEntry(Record):
    """One registered model: what it was trained on (snapshot = acquire key), how, and how well."""

    key: str
    dataset: str
    model: str
    snapshot: str
    artifacts: dict[str, str]  # stage -> artifact key, acquire to evaluate
    config: dict[str, Any]  # the PipelineConfig it was trained with
    metrics: dict[str, Any]  # the evaluate stage's metrics: {"valid": {...}, "test": {...}}
    created_at: str


@dataclass(frozen=True)
class Decision(Record):
    """A challenger against the champion: promoted or not, and the numbers that decided it."""

    dataset: str
    model: str
    challenger: str
    champion: str | None
    promoted: bool
    details: dict[str, Any]
    at: str


class ModelRegistry:
    """The registry file of a data root (created on first write)."""

    def __init__(self, data_root: Path | str) -> None:
        self.path = Path(data_root) / REGISTRY_FILE

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60)
        try:
            conn.executescript(_SCHEMA)
            with conn:  # one transaction: committed whole or rolled back
                yield conn
        finally:
            conn.close()

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A read's rows; none before the registry file exists (a read never creates it)."""
        if not self.path.is_file():
            return []
        with self._connect() as conn:
            return conn.execute(sql, args).fetchall()

    def register(self, entry: ModelEntry) -> bool:
        """Add ``entry``; False when its key is registered already (the same model trained again)."""
        with self._connect() as conn:
            row = (entry.key, entry.dataset, entry.model, entry.snapshot, json.dumps(entry.artifacts),
                   json.dumps(entry.config), json.dumps(entry.metrics), entry.created_at)
            return conn.execute("INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row).rowcount == 1

    def models(self, dataset: str | None = None) -> list[ModelEntry]:
        query, args = "SELECT * FROM models", ()
        if dataset is not None:
            query, args = query + " WHERE dataset = ?", (dataset,)
        return [_entry(row) for row in self._query(query + " ORDER BY created_at, rowid", args)]

    def get(self, key: str) -> ModelEntry:
        """The model whose key is or starts with ``key`` (one line naming the problem otherwise)."""
        if not key:
            raise ConfigError("model key must not be empty")
        found = [m for m in self.models() if m.key.startswith(key)]
        if not found:
            raise ConfigError(f"no registered model with key {key!r} (see `sand models list`)")
        if len(found) > 1:
            raise ConfigError(f"model key {key!r} is ambiguous: {', '.join(m.key for m in found)}")
        return found[0]

    def champion(self, dataset: str, model: str) -> ModelEntry | None:
        rows = self._query("SELECT key FROM champions WHERE dataset = ? AND model = ?", (dataset, model))
        return self.get(rows[0][0]) if rows else None

    def champions(self) -> dict[tuple[str, str], str]:
        """(dataset, model) -> the champion's key."""
        return {(d, m): k for d, m, k in self._query("SELECT dataset, model, key FROM champions")}

    def decide(self, decision: Decision) -> None:
        """Record ``decision``; a promoted challenger becomes the champion in the same transaction."""
        with self._connect() as conn:
            row = (decision.dataset, decision.model, decision.challenger, decision.champion, int(decision.promoted),
                   json.dumps(decision.details), decision.at)
            conn.execute("INSERT INTO decisions (dataset, model, challenger, champion, promoted, details, at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            if decision.promoted:
                conn.execute("INSERT OR REPLACE INTO champions VALUES (?, ?, ?, ?)",
                             (decision.dataset, decision.model, decision.challenger, decision.at))

    def decisions(self, key: str | None = None) -> list[Decision]:
        """Every decision (or those where ``key`` was the challenger or the champion), oldest first."""
        query, args = "SELECT dataset, model, challenger, champion, promoted, details, at FROM decisions", ()
        if key is not None:
            query, args = query + " WHERE challenger = ? OR champion = ?", (key, key)
        rows = self._query(query + " ORDER BY id", args)
        return [Decision(d, m, c, ch, bool(p), json.loads(det), at) for d, m, c, ch, p, det, at in rows]

    def source_states(self, dataset: str, model: str) -> dict[str, Any] | None:
        """The sources as the last finished retrain of (dataset, model) saw them; None before the first."""
        rows = self._query("SELECT states FROM sources WHERE dataset = ? AND model = ?", (dataset, model))
        return json.loads(rows[0][0]) if rows else None

    def save_source_states(self, dataset: str, model: str, states: Mapping[str, Any]) -> None:
        with self._connect() as conn:
            conn.execute("INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?)",
                         (dataset, model, json.dumps(dict(states), sort_keys=True), now()))


def _entry(row: tuple[Any, ...]) -> ModelEntry:
    key, dataset, model, snapshot, artifacts, config, metrics, created_at = row
    return ModelEntry(key, dataset, model, snapshot, json.loads(artifacts), json.loads(config),
                      json.loads(metrics), created_at)
