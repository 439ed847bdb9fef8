"""Rollouts in PostgreSQL (`rollouts`, `rollout_targets`, `twins`; schema in pgsink.py).

The database is the rollout's memory: the tool that drives a rollout writes the decisions
of the state machine (edgerund/backend/rollout.py) here BEFORE it acts on them, so a
killed tool resumes from what was decided, and `fleet status` / `fleet abort` work from
any machine. A target's `status` is free text (no CHECK constraint, no enum: the
machine's vocabulary, `overridden` included, needs no migration). Blocking psycopg
calls: the driver runs them with `asyncio.to_thread`.

Two processes never drive one rollout: the driver holds a session advisory lock on the
rollout's id (`try_lock`), which PostgreSQL releases when its connection ends, however the
tool died. `fleet abort` does not need the lock: it sets the state in the row, and the
driver's `save` refuses to record (and so to send) anything once the row says `aborted`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgerund.backend import rollout as R
from edgerund.backend.pgsink import ensure_schema

_LOCK_NS = 0x6564_6765  # "edge": advisory lock namespace of rollouts (two-int form)


@dataclass(frozen=True, slots=True)
class Info:
    """What the machine does not need but the rollout row keeps."""

    sha256: str
    size: int
    selector: str
    waves: str


@dataclass(frozen=True, slots=True)
class Doc:
    """The desired document sent (or to send) to one gateway for this rollout."""

    version: int
    raw: bytes
    previous: Mapping[str, Any] | None  # the `signed` part of the document it replaced


class RolloutStore:
    def __init__(self, dsn: str, *, application_name: str = "edgerund-fleet") -> None:
        import psycopg

        self.conn = psycopg.connect(
            dsn, autocommit=True, options="-c TimeZone=UTC", application_name=application_name
        )
        ensure_schema(self.conn)

    def close(self) -> None:
        self.conn.close()

    def try_lock(self, rollout_id: str) -> bool:
        row = self.conn.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_LOCK_NS, rollout_id)
        ).fetchone()
        return bool(row and row[0])

    # ------------------------------------------------------------------ writing

    def create(self, r: R.Rollout, info: Info) -> None:
        with self.conn.transaction():
            self.conn.execute(
                "INSERT INTO rollouts (id, model, version, sha256, size, selector, waves, "
                "wave_ends, halt_if, soak_s, timeout_s, state, wave, soak_until, reason) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    r.id, r.model, r.version, info.sha256, info.size, info.selector,
                    info.waves, r.waves, r.halt_if, r.soak_s, r.timeout_s, r.state, r.wave,
                    r.soak_until, r.reason,
                ),
            )  # fmt: skip
            self._targets(r, {})
        r.dirty.clear()

    def save(self, r: R.Rollout, docs: Mapping[str, Doc]) -> bool:
        """The rollout row and its changed targets (with the documents about to be sent),
        in one transaction; False (nothing written) when the rollout was aborted meanwhile
        by `fleet abort` and this state is not the abort itself."""
        with self.conn.transaction():
            row = self.conn.execute(
                "SELECT state FROM rollouts WHERE id = %s FOR UPDATE", (r.id,)
            ).fetchone()
            if row is None:
                raise KeyError(f"rollout {r.id!r} is not in the database")
            if row[0] in R.FINAL_STATES and row[0] != r.state:
                return False
            self.conn.execute(
                "UPDATE rollouts SET state = %s, wave = %s, soak_until = %s, reason = %s, "
                "updated = now() WHERE id = %s",
                (r.state, r.wave, r.soak_until, r.reason, r.id),
            )
            self._targets(r, docs)
        r.dirty.clear()
        return True

    def _targets(self, r: R.Rollout, docs: Mapping[str, Doc]) -> None:
        ords = {g: i for i, g in enumerate(r.order)}
        for g in sorted(r.dirty | set(docs)):
            t = r.targets[g]
            d = docs.get(g)
            self.conn.execute(
                "INSERT INTO rollout_targets (rollout, gateway, site, ord, wave, status, "
                "outcome, reason, prev_version, sent_at, done_at, desired_version, "
                "desired_doc, prev_desired) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (rollout, gateway) DO UPDATE SET status = EXCLUDED.status, "
                "outcome = EXCLUDED.outcome, reason = EXCLUDED.reason, "
                "sent_at = EXCLUDED.sent_at, done_at = EXCLUDED.done_at, "
                "desired_version = coalesce(EXCLUDED.desired_version, "
                "rollout_targets.desired_version), "
                "desired_doc = coalesce(EXCLUDED.desired_doc, rollout_targets.desired_doc), "
                "prev_desired = coalesce(EXCLUDED.prev_desired, rollout_targets.prev_desired), "
                "updated = now()",
                (
                    r.id, g, t.site, ords.get(g, -1), t.wave, t.status, t.outcome, t.reason,
                    t.prev_version, t.sent_at, t.done_at,
                    d.version if d else None, d.raw if d else None,
                    json.dumps(d.previous) if d and d.previous is not None else None,
                ),
            )  # fmt: skip

    def abort(self, rollout_id: str, reason: str) -> str:
        """Mark it aborted unless it already ended; returns the state it is in now."""
        with self.conn.transaction():
            row = self.conn.execute(
                "SELECT state FROM rollouts WHERE id = %s FOR UPDATE", (rollout_id,)
            ).fetchone()
            if row is None:
                raise KeyError(f"no rollout {rollout_id!r}")
            if row[0] in R.FINAL_STATES:
                return str(row[0])
            self.conn.execute(
                "UPDATE rollouts SET state = 'aborted', reason = %s, soak_until = NULL, "
                "updated = now() WHERE id = %s",
                (reason, rollout_id),
            )
        return "aborted"

    def set_reverted(self, rollout_id: str, gateway: str, version: int) -> None:
        self.conn.execute(
            "UPDATE rollout_targets SET reverted_version = %s, updated = now() "
            "WHERE rollout = %s AND gateway = %s",
            (version, rollout_id, gateway),
        )

    def upsert_twin(
        self,
        gateway: str,
        site: str | None,
        reported: Mapping[str, Any] | None = None,
        desired: Mapping[str, Any] | None = None,
    ) -> None:
        """Record the latest reported and/or desired (signed part) of a gateway."""
        rep = json.dumps(reported) if reported is not None else None
        des = json.dumps(desired) if desired is not None else None
        rv = reported.get("seq") if reported is not None else None
        dv = desired.get("version") if desired is not None else None
        self.conn.execute(
            "INSERT INTO twins AS t (gateway, site, reported, reported_version, reported_at, "
            "desired, desired_version, desired_at) VALUES (%s, %s, %s::jsonb, %s, "
            "CASE WHEN %s::jsonb IS NULL THEN NULL ELSE now() END, %s::jsonb, %s, "
            "CASE WHEN %s::jsonb IS NULL THEN NULL ELSE now() END) "
            "ON CONFLICT (gateway) DO UPDATE SET site = coalesce(EXCLUDED.site, t.site), "
            "reported = coalesce(EXCLUDED.reported, t.reported), "
            "reported_version = coalesce(EXCLUDED.reported_version, t.reported_version), "
            "reported_at = coalesce(EXCLUDED.reported_at, t.reported_at), "
            "desired = CASE WHEN EXCLUDED.desired_version >= coalesce(t.desired_version, 0) "
            "THEN EXCLUDED.desired ELSE t.desired END, "
            "desired_version = greatest(EXCLUDED.desired_version, t.desired_version), "
            "desired_at = CASE WHEN EXCLUDED.desired_version >= coalesce(t.desired_version, 0) "
            "THEN EXCLUDED.desired_at ELSE t.desired_at END",
            (gateway, site, rep, rv, rep, des, dv, des),
        )

    # ------------------------------------------------------------------ reading

    def state_of(self, rollout_id: str) -> str | None:
        row = self.conn.execute(
            "SELECT state FROM rollouts WHERE id = %s", (rollout_id,)
        ).fetchone()
        return str(row[0]) if row else None

    def twin_desired(self, gateway: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT desired FROM twins WHERE gateway = %s", (gateway,)
        ).fetchone()
        return dict(row[0]) if row and isinstance(row[0], dict) else None

    def in_flight(self, model: str, gateways: list[str]) -> dict[str, str]:
        """Gateways of `gateways` that a running rollout of `model` holds (gateway -> id):
        two rollouts must not fight over one gateway's desired document."""
        rows = self.conn.execute(
            "SELECT t.gateway, r.id FROM rollout_targets t JOIN rollouts r ON r.id = t.rollout "
            "WHERE r.model = %s AND r.state IN ('running', 'soaking') "
            "AND t.status <> 'skipped' AND t.gateway = ANY(%s)",
            (model, gateways),
        ).fetchall()
        return {str(g): str(i) for g, i in rows}

    def bundle_for(self, model: str, version: str) -> tuple[str, int] | None:
        """The bundle (sha256, size) an earlier rollout used for `model` `version`."""
        row = self.conn.execute(
            "SELECT sha256, size FROM rollouts WHERE model = %s AND version = %s "
            "ORDER BY (state = 'succeeded') DESC, created DESC LIMIT 1",
            (model, version),
        ).fetchone()
        return (str(row[0]), int(row[1])) if row else None

    def load(self, rollout_id: str) -> tuple[R.Rollout, Info, dict[str, Doc]]:
        row = self.conn.execute(
            "SELECT model, version, sha256, size, selector, waves, wave_ends, halt_if, "
            "soak_s, timeout_s, state, wave, soak_until, reason FROM rollouts WHERE id = %s",
            (rollout_id,),
        ).fetchone()
        if row is None:
            raise KeyError(f"no rollout {rollout_id!r}")
        (model, version, sha, size, sel, waves, ends, halt, soak, tmo, state, wave, su, why) = row
        targets: dict[str, R.Target] = {}
        order: list[tuple[int, str]] = []
        docs: dict[str, Doc] = {}
        for t in self.conn.execute(
            "SELECT gateway, site, ord, wave, status, outcome, reason, prev_version, sent_at, "
            "done_at, desired_version, desired_doc, prev_desired FROM rollout_targets "
            "WHERE rollout = %s ORDER BY gateway",
            (rollout_id,),
        ):
            (gw, site, ord_, twave, status, outcome, reason, prev, sent, done, dv, doc, pd) = t
            targets[gw] = R.Target(gw, site, twave, status, outcome, reason, prev, sent, done)
            if ord_ >= 0:
                order.append((ord_, gw))
            if dv is not None and doc is not None:
                docs[gw] = Doc(int(dv), bytes(doc), pd)
        r = R.Rollout(
            rollout_id, model, version, halt, soak, tmo, list(ends), targets,
            [g for _, g in sorted(order)], state, wave, su, why,
        )  # fmt: skip
        return r, Info(sha, int(size), sel, waves), docs

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        out = []
        for row in self.conn.execute(
            "SELECT r.id, r.model, r.version, r.state, r.wave, array_length(r.wave_ends, 1), "
            "r.reason, r.created, r.updated, "
            "count(t.*) FILTER (WHERE t.status <> 'skipped'), "
            "count(t.*) FILTER (WHERE t.status NOT IN ('pending', 'skipped')), "
            "count(t.*) FILTER (WHERE t.status = 'committed'), "
            "count(t.*) FILTER (WHERE t.status = 'failed'), "
            "count(t.*) FILTER (WHERE t.status = 'overridden') "
            "FROM rollouts r LEFT JOIN rollout_targets t ON t.rollout = r.id "
            "GROUP BY r.id ORDER BY r.created DESC LIMIT %s",
            (limit,),
        ):
            (rid, model, ver, state, wave, waves, reason, created, updated, n, reached, ok, bad,
             over) = row  # fmt: skip
            out.append(
                {
                    "id": rid,
                    "model": model,
                    "version": ver,
                    "state": state,
                    "wave": wave + 1,
                    "waves": waves or 0,
                    "gateways": n,
                    "reached": reached,
                    "committed": ok,
                    "failed": bad,
                    "overridden": over,
                    "reason": reason,
                    "created": created.isoformat(),
                    "updated": updated.isoformat(),
                }
            )
        return out


def now() -> float:
    """The rollout clock: wall-clock seconds, so that times survive a restart."""
    return time.time()
