"""structlog set-up: JSON lines for journald, readable console output on a terminal.

Every event also lands in an in-memory ring (`LogRing`) that `edgerunctl log -n N` reads,
so a technician sees recent warnings without journal access. The level can change live
on SIGHUP (`set_level`).
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class LogRing:
    """The last N log events as dicts (already rendered-safe: values made JSON-able)."""

    def __init__(self, size: int = 2000) -> None:
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self.counts: collections.Counter[str] = collections.Counter()

    def resize(self, size: int) -> None:
        if size != self._events.maxlen:
            self._events = collections.deque(self._events, maxlen=size)

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        entry = {k: _jsonable(v) for k, v in event_dict.items() if k != "exc_info"}
        entry.setdefault("timestamp", time.time())
        self._events.append(entry)
        self.counts[str(event_dict.get("level", method))] += 1
        return event_dict

    def tail(self, n: int, min_level: str | None = None) -> list[dict[str, Any]]:
        events = list(self._events)
        if min_level is not None:
            floor = _LEVELS.get(min_level, logging.DEBUG)
            events = [e for e in events if _LEVELS.get(str(e.get("level")), 0) >= floor]
        return events[-n:] if n > 0 else []


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return repr(v)


RING = LogRing()
_level_filter = {"level": logging.INFO}


def _filter_level(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if _LEVELS.get(method, logging.INFO) < _level_filter["level"]:
        raise structlog.DropEvent
    return event_dict


def set_level(level: str) -> None:
    _level_filter["level"] = _LEVELS.get(level, logging.INFO)


def configure(level: str = "info", fmt: str = "auto", ring_size: int = 2000) -> None:
    """Configure structlog once per process. `fmt`: auto | json | console."""
    set_level(level)
    RING.resize(ring_size)
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            _filter_level,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            RING,
            structlog.processors.format_exc_info if not use_console else _noop,
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (aiomqtt/paho) go to the same stream at WARNING;
    # in JSON mode as JSON lines too, so a log shipper (or the soak harness) never meets a
    # bare "ERROR mqtt: ..." line in the middle of a JSON stream.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s: %(message)s")
        if use_console
        else _JsonLineFormatter()
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_edgerund", False):
            root.removeHandler(h)
    handler._edgerund = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


class _JsonLineFormatter(logging.Formatter):
    """A stdlib record as one JSON object with the keys our structlog events carry."""

    def format(self, record: logging.LogRecord) -> str:
        import datetime as _dt
        import json as _json

        out: dict[str, Any] = {
            "event": record.getMessage(),
            "logger": record.name,
            "level": record.levelname.lower(),
            "timestamp": _dt.datetime.fromtimestamp(record.created, _dt.UTC)
            .isoformat()
            .replace("+00:00", "Z"),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return _json.dumps(out)


def _noop(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return event_dict
