"""Modbus RTU slave emulator on a pty: several unit ids, FC 3/4/6/16, real exceptions.

Each `ModbusUnit` holds a holding-register table and an input-register table (dicts
address -> 16-bit value). Only addresses present exist: a request touching any other
gets exception 02 ILLEGAL DATA ADDRESS; an unsupported function gets 01 ILLEGAL
FUNCTION; a register count of 0 or above 125 (123 for writes) gets 03 ILLEGAL DATA VALUE.
Requests for unit ids we do not emulate, and requests with a bad CRC, get no answer, as
on a real bus (the master times out). Unit 0 (broadcast) writes are applied to every
unit without a reply.

Requests are framed by length from the function code (8 bytes for FC 3/4/6, 9 + byte
count for FC 16); anything else is flushed after a silence gap. `update(t, unit)`
callbacks refresh register values from the scenario before each answer, and
`writes` records every accepted write (tests and actuator loops check it).
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable, Mapping
from typing import Literal

from drivers.emulated.serial import Faults, PtySerialDevice
from drivers.serial.modbus import crc16, encode_value

__all__ = ["ModbusSlaveEmulator", "ModbusUnit"]


class ModbusUnit:
    def __init__(
        self,
        holding: Mapping[int, int] | None = None,
        inputs: Mapping[int, int] | None = None,
        update: Callable[[float, ModbusUnit], None] | None = None,
    ) -> None:
        self.holding: dict[int, int] = dict(holding or {})
        self.inputs: dict[int, int] = dict(inputs or {})
        self.update = update

    def set(
        self,
        address: int,
        value: float,
        type: str = "uint16",
        word_order: str = "big",
        table: Literal["holding", "input"] = "holding",
    ) -> None:
        """Store an engineering raw value with the same codec the master decodes."""
        regs = encode_value(value, type, word_order)
        tab = self.holding if table == "holding" else self.inputs
        for i, w in enumerate(regs):
            tab[address + i] = w


class ModbusSlaveEmulator(PtySerialDevice):
    def __init__(
        self,
        link: str | os.PathLike[str],
        *,
        units: Mapping[int, ModbusUnit],
        response_delay_s: float = 0.0,
        wire_baudrate: int | None = None,
        seed: int = 0,
        faults: Faults | None = None,
        dropout: Callable[[float], bool] | None = None,
    ) -> None:
        super().__init__(link, seed=seed, faults=faults, dropout=dropout)
        self.units = dict(units)
        self.response_delay_s = response_delay_s
        # a pty moves bytes instantly: with wire_baudrate set, each reply is held back by
        # the time request and reply would take on a real line at that baud rate (8N1)
        self.wire_baudrate = wire_baudrate
        self._buf = bytearray()
        self._flush: asyncio.TimerHandle | None = None
        self.writes: list[tuple[int, int, list[int]]] = []  # (unit, address, values)
        self.counters.update({"requests": 0, "crc_errors": 0, "exceptions": 0, "ignored": 0})

    def on_receive(self, data: bytes) -> None:
        self._buf += data
        while True:
            n = self._request_length()
            if n is None or len(self._buf) < n:
                break
            frame = bytes(self._buf[:n])
            del self._buf[:n]
            self._handle(frame)
        if self._buf:
            # an unknown function or a partial request: flush after a silence gap
            if self._flush is not None:
                self._flush.cancel()
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(0.01, self._flush_buffer)

    def _request_length(self) -> int | None:
        b = self._buf
        if len(b) < 2:
            return None
        fc = b[1]
        if fc in (3, 4, 6):
            return 8
        if fc == 16:
            return None if len(b) < 7 else 9 + b[6]
        return None

    def _flush_buffer(self) -> None:
        self._flush = None
        frame = bytes(self._buf)
        self._buf.clear()
        if len(frame) >= 4:
            self._handle(frame)

    def _handle(self, frame: bytes) -> None:
        if crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
            self.counters["crc_errors"] += 1
            return
        unit_id, fc = frame[0], frame[1]
        if self.stalled:
            self.counters["ignored"] += 1
            return
        targets = (
            list(self.units.items())
            if unit_id == 0
            else ([(unit_id, self.units[unit_id])] if unit_id in self.units else [])
        )
        if not targets:
            self.counters["ignored"] += 1
            return
        self.counters["requests"] += 1
        reply = b""
        for uid, unit in targets:
            if unit.update is not None:
                unit.update(self.now(), unit)
            reply = self._answer(uid, unit, fc, frame[2:-2])
        if unit_id == 0:
            return  # broadcast: no reply
        out = reply + crc16(reply).to_bytes(2, "little")
        delay = self.response_delay_s
        if self.wire_baudrate:
            delay += (len(frame) + len(out)) * 10.0 / self.wire_baudrate
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.send, out)
        else:
            self.send(out)

    def _exc(self, uid: int, fc: int, code: int) -> bytes:
        self.counters["exceptions"] += 1
        return bytes([uid, fc | 0x80, code])

    def _answer(self, uid: int, unit: ModbusUnit, fc: int, pdu: bytes) -> bytes:
        if fc in (3, 4):
            if len(pdu) != 4:
                return self._exc(uid, fc, 3)
            addr, count = struct.unpack(">HH", pdu)
            if not 1 <= count <= 125:
                return self._exc(uid, fc, 3)
            table = unit.holding if fc == 3 else unit.inputs
            if any(a not in table for a in range(addr, addr + count)):
                return self._exc(uid, fc, 2)
            values = [table[a] for a in range(addr, addr + count)]
            return bytes([uid, fc, 2 * count]) + struct.pack(f">{count}H", *values)
        if fc == 6:
            if len(pdu) != 4:
                return self._exc(uid, fc, 3)
            addr, value = struct.unpack(">HH", pdu)
            if addr not in unit.holding:
                return self._exc(uid, fc, 2)
            unit.holding[addr] = value
            self.writes.append((uid, addr, [value]))
            return bytes([uid, fc]) + pdu
        if fc == 16:
            if len(pdu) < 5:
                return self._exc(uid, fc, 3)
            addr, count, nbytes = struct.unpack(">HHB", pdu[:5])
            if not 1 <= count <= 123 or nbytes != 2 * count or len(pdu) != 5 + nbytes:
                return self._exc(uid, fc, 3)
            if any(a not in unit.holding for a in range(addr, addr + count)):
                return self._exc(uid, fc, 2)
            values = list(struct.unpack(f">{count}H", pdu[5:]))
            for i, v in enumerate(values):
                unit.holding[addr + i] = v
            self.writes.append((uid, addr, values))
            return bytes([uid, fc]) + struct.pack(">HH", addr, count)
        return self._exc(uid, fc, 1)
