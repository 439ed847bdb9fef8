"""Line-oriented instruments: CSV, key=value and JSON-lines.

Theory of operation
-------------------
Many bench and field instruments print one text line per measurement, on their own or
when asked (a poll command such as ``READ?\\r\\n``). The pure part here, `LineParser`,
takes one line (bytes, delimiter already removed) and returns `Reading`s or raises our
`FrameError`:

- ``csv``: fields picked by column index (``column``, default the field's position in the
  list), split on ``delimiter`` (default ``,``).
- ``kv``: ``key=value`` or ``key:value`` pairs separated by commas, semicolons or blanks;
  fields picked by ``key`` (default the field's name).
- ``json``: one JSON object per line; fields picked by ``key`` (dots walk into nested
  objects: ``env.temp``).

Each configured field maps to a channel: ``value = raw * scale + offset`` in ``unit``.
A value of ``nan`` becomes a BAD-quality reading (instruments print it for "no data");
anything non-numeric, a missing field or an unparseable line is a FrameError that the
driver counts and skips. Framing (`DelimitedFramer`) drops overlong lines and resyncs at
the next newline, so garbage costs at most the line it hit.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import msgspec

from drivers.base import ChannelInfo, Quality, Reading, Resources
from drivers.errors import DeviceError, FrameError
from drivers.registry import SensorSpec
from drivers.serial.common import (
    FramedStreamSensor,
    SerialSensorConfig,
    check_serial_keys,
    stream_frames,
)

__all__ = ["SENSOR", "LineConfig", "LineField", "LineParser", "LineSensor"]


class LineField(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str  # channel name
    key: str | None = None  # kv/json: key in the line (default: name); json: dotted path
    column: int | None = None  # csv: 0-based column (default: position in `fields`)
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""


class LineConfig(SerialSensorConfig, tag="line", kw_only=True):
    format: Literal["csv", "kv", "json"] = "csv"
    fields: list[LineField] = msgspec.field(default_factory=list)
    delimiter: str = ","  # csv column separator
    max_line_bytes: int = 512
    poll_command: str | None = None  # e.g. "READ?\r\n": written at rate_hz, one line back
    encoding: str = "ascii"

    def __post_init__(self) -> None:
        check_serial_keys(self)
        if not self.fields:
            raise ValueError("fields: expected at least one field (name, key/column, scale, unit)")
        names = [f.name for f in self.fields]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"fields: duplicate channel name(s) {sorted(dup)}")
        if len(self.delimiter) != 1:
            raise ValueError(f"delimiter: expected one character, got {self.delimiter!r}")
        if not 8 <= self.max_line_bytes <= 65536:
            raise ValueError(f"max_line_bytes: expected 8..65536, got {self.max_line_bytes}")
        for f in self.fields:
            if f.column is not None and f.column < 0:
                raise ValueError(f"fields[{f.name}].column: expected >= 0, got {f.column}")
            if not math.isfinite(f.scale) or not math.isfinite(f.offset):
                raise ValueError(f"fields[{f.name}]: scale and offset must be finite")
        try:
            "x".encode(self.encoding)
        except LookupError:
            raise ValueError(f"encoding: unknown codec {self.encoding!r}") from None


_KV_SPLIT = re.compile(r"[,;\s]+")


class LineParser:
    """Pure: one line -> readings, or FrameError."""

    def __init__(
        self,
        fmt: Literal["csv", "kv", "json"],
        fields: Sequence[LineField],
        delimiter: str = ",",
        encoding: str = "ascii",
    ) -> None:
        self.format = fmt
        self.fields = list(fields)
        self.delimiter = delimiter
        self.encoding = encoding

    def parse(self, line: bytes) -> list[Reading]:
        try:
            text = line.decode(self.encoding).strip()
        except UnicodeDecodeError as exc:
            raise FrameError("syntax", f"not {self.encoding} text: {exc.reason}") from None
        if not text:
            raise FrameError("syntax", "empty line")
        if self.format == "csv":
            raws = self._csv(text)
        elif self.format == "kv":
            raws = self._kv(text)
        else:
            raws = self._json(text)
        out: list[Reading] = []
        for f, raw in zip(self.fields, raws, strict=True):
            value = raw * f.scale + f.offset
            if math.isnan(value) or math.isinf(value):
                out.append(Reading(f.name, math.nan, Quality.BAD))
            else:
                out.append(Reading(f.name, value))
        return out

    @staticmethod
    def _number(field: LineField, tok: Any) -> float:
        if isinstance(tok, bool):
            return 1.0 if tok else 0.0
        if isinstance(tok, (int, float)):
            try:
                return float(tok)
            except OverflowError:  # a JSON integer beyond float range
                return math.inf
        if tok is None:
            return math.nan
        if isinstance(tok, str):
            s = tok.strip()
            try:
                return float(s)
            except ValueError:
                pass
        raise FrameError("syntax", f"field {field.name}: expected a number, got {str(tok)[:32]!r}")

    def _csv(self, text: str) -> list[float]:
        cols = text.split(self.delimiter)
        out = []
        for i, f in enumerate(self.fields):
            idx = f.column if f.column is not None else i
            if idx >= len(cols):
                raise FrameError(
                    "missing_field",
                    f"field {f.name}: expected column {idx}, line has {len(cols)} columns",
                )
            out.append(self._number(f, cols[idx]))
        return out

    def _kv(self, text: str) -> list[float]:
        pairs: dict[str, str] = {}
        for tok in _KV_SPLIT.split(text):
            if not tok:
                continue
            m = re.match(r"([^=:]+)[=:](.*)", tok)
            if m is None:
                raise FrameError("syntax", f"expected key=value, got {tok[:32]!r}")
            pairs[m.group(1).strip()] = m.group(2)
        out = []
        for f in self.fields:
            key = f.key or f.name
            if key not in pairs:
                raise FrameError("missing_field", f"field {f.name}: key {key!r} not in line")
            out.append(self._number(f, pairs[key]))
        return out

    def _json(self, text: str) -> list[float]:
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise FrameError("syntax", f"not JSON: {str(exc)[:60]}") from None
        if not isinstance(obj, dict):
            raise FrameError("syntax", f"expected a JSON object, got {type(obj).__name__}")
        out = []
        for f in self.fields:
            key = f.key or f.name
            cur: Any = obj
            for part in key.split("."):
                if not isinstance(cur, dict) or part not in cur:
                    raise FrameError("missing_field", f"field {f.name}: key {key!r} not in object")
                cur = cur[part]
            out.append(self._number(f, cur))
        return out


class LineSensor(FramedStreamSensor):
    """Stream sensor for a line instrument (optionally polled with a command)."""

    def __init__(self, cfg: LineConfig, resources: Resources) -> None:
        super().__init__(cfg, resources, b"\n", cfg.max_line_bytes)
        self.cfg = cfg
        self.channels = [ChannelInfo(f.name, f.unit) for f in cfg.fields]
        self.parser = LineParser(cfg.format, cfg.fields, cfg.delimiter, cfg.encoding)
        self.counters: dict[str, int] = {
            "frames": 0,
            "frame_errors": 0,
            "syntax_errors": 0,
            "missing_fields": 0,
            "resyncs": 0,
            "timeouts": 0,
        }

    def _parse(self, raw: bytes) -> list[Reading] | None:
        self.counters["resyncs"] = self.framer.resyncs
        try:
            readings = self.parser.parse(raw)
        except FrameError as exc:
            self.counters["frame_errors"] += 1
            key = "missing_fields" if exc.kind == "missing_field" else "syntax_errors"
            self.counters[key] += 1
            return None
        self.counters["frames"] += 1
        return readings

    def frames(self) -> AsyncIterator[Sequence[Reading]]:
        if self.cfg.poll_command is not None:
            return self._polled()
        return stream_frames(self.pump, self._parse)

    async def _polled(self) -> AsyncIterator[Sequence[Reading]]:
        assert self.cfg.poll_command is not None
        cmd = self.cfg.poll_command.encode(self.cfg.encoding)
        loop = asyncio.get_running_loop()
        period = 1.0 / self.cfg.rate_hz
        timeout_s = self.cfg.read_timeout_ms / 1000.0
        misses = 0
        next_t = loop.time()
        while True:
            self.port.discard_input()
            self.pump.reset()
            await self.port.write(cmd)
            try:
                raw = await self.pump.next_frame(timeout_s)
            except DeviceError:
                if self.port.lost:
                    raise
                self.counters["timeouts"] += 1
                misses += 1
                if misses > self.cfg.retries:
                    raise
                raw = None
            if raw is not None:
                misses = 0
                readings = self._parse(raw)
                if readings is not None:
                    yield readings
            # absolute deadlines: a slow answer does not push every later poll back
            next_t += period
            now = loop.time()
            if next_t < now:
                next_t = now
            await asyncio.sleep(next_t - now)


def _factory(cfg: LineConfig, resources: Resources) -> LineSensor:
    return LineSensor(cfg, resources)


SENSOR = SensorSpec(
    name="line",
    config_type=LineConfig,
    factory=_factory,
    transport="serial",
    summary="CSV, key=value or JSON-lines instrument on a serial port (streamed or polled)",
)
