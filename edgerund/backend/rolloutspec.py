"""What the operator writes for a rollout, parsed and evaluated (pure): the selector over
gateways' reported twins, the cumulative wave sizes, and the halt rule.

Selector: `key=glob[|glob...]` or `key!=glob`, comma-separated, all must hold; the facts a
reported document offers are in `facts_of`. Waves: `1,10%,50%,100%`, cumulative, absolute
or a percentage of the targets; `wave_ends` cuts N targets into strictly growing ends
(a wave that adds nobody is dropped). Halt rule: a small recursive-descent grammar

    rule := and ("or" and)*      and := not ("and" not)*
    not  := "not" not | "(" rule ")" | METRIC OP NUMBER["%"]

over the counts in `METRICS` (docs/fleet.md §8); a percentage compares only with a
`*_rate`. Every error is a `RolloutError` whose message says where and what.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

COUNTS = (
    "targeted",
    "committed",
    "overridden",
    "pending",
    "rolled_back",
    "refused",
    "error",
    "timed_out",
    "failed",
)
METRICS = frozenset(COUNTS) | frozenset(f"{c}_rate" for c in COUNTS)


class RolloutError(ValueError):
    """A selector, wave list or halt rule that does not parse (message says where)."""


# --------------------------------------------------------------------------- selector


@dataclass(frozen=True, slots=True)
class Term:
    key: str
    negate: bool
    patterns: tuple[str, ...]

    def matches(self, facts: Mapping[str, str]) -> bool:
        value = facts.get(self.key)
        hit = value is not None and any(fnmatch.fnmatchcase(value, p) for p in self.patterns)
        return hit != self.negate


@dataclass(frozen=True, slots=True)
class Selector:
    """All terms must match; an empty selector matches every gateway."""

    terms: tuple[Term, ...]

    def matches(self, facts: Mapping[str, str]) -> bool:
        return all(t.matches(facts) for t in self.terms)


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def parse_selector(text: str) -> Selector:
    """`key=glob[|glob...]` or `key!=glob`, comma-separated; globs are fnmatch patterns."""
    terms = []
    for i, raw in enumerate(p.strip() for p in text.split(",")):
        if not raw:
            if text.strip():
                raise RolloutError(f"selector term {i + 1}: empty")
            continue
        negate = "!=" in raw
        key, sep, value = raw.partition("!=" if negate else "=")
        key, value = key.strip(), value.strip()
        if not sep or not _KEY.match(key) or not value:
            raise RolloutError(f"selector term {i + 1}: expected key=pattern, got {raw!r}")
        terms.append(Term(key, negate, tuple(v.strip() for v in value.split("|"))))
    return Selector(tuple(terms))


def as_map(v: object) -> Mapping[str, Any]:
    """`v` if it is a mapping, else an empty one (documents from the wire)."""
    return v if isinstance(v, Mapping) else {}


_d = as_map


def facts_of(reported: Mapping[str, Any]) -> dict[str, str]:
    """What a selector can match in a reported document: its top-level scalars (`site`,
    `gateway`, `daemon_version`, a `hardware_id` if the gateway reports one), `identity`
    (the identity kind), `labels.K`, and `model.NAME` (the running version)."""
    facts = {k: str(v) for k, v in reported.items() if isinstance(v, str | int | float | bool)}
    hw = _d(reported.get("hardware"))
    if "hardware_id" not in facts and isinstance(hw.get("id"), str):
        facts["hardware_id"] = hw["id"]
    kind = _d(reported.get("identity")).get("kind")
    if isinstance(kind, str):
        facts["identity"] = kind
    for k, v in _d(reported.get("labels")).items():
        facts[f"labels.{k}"] = str(v)
    models = reported.get("models")
    for m in models if isinstance(models, list) else []:
        if isinstance(m, Mapping) and isinstance(m.get("name"), str):
            facts[f"model.{m['name']}"] = str(m.get("version"))
    return facts


# --------------------------------------------------------------------------- waves


@dataclass(frozen=True, slots=True)
class WaveSize:
    count: int | None = None
    percent: float | None = None

    def __str__(self) -> str:
        return f"{self.count}" if self.count is not None else f"{self.percent:g}%"


def parse_waves(text: str) -> list[WaveSize]:
    """`1,10%,50%,100%`: cumulative sizes, absolute or a percentage of the targets."""
    out = []
    for i, raw in enumerate(p.strip() for p in text.split(",")):
        try:
            if raw.endswith("%"):
                pct = float(raw[:-1])
                if not 0 < pct <= 100 or math.isnan(pct):
                    raise ValueError
                out.append(WaveSize(percent=pct))
            else:
                n = int(raw)
                if n < 1:
                    raise ValueError
                out.append(WaveSize(count=n))
        except ValueError:
            raise RolloutError(
                f"wave {i + 1}: expected a count >= 1 or a percentage in (0, 100], got {raw!r}"
            ) from None
    if not out:
        raise RolloutError("no waves")
    return out


def wave_ends(sizes: Sequence[WaveSize], n: int) -> list[int]:
    """Cumulative end index of each wave over `n` targets: strictly increasing, at most n;
    a wave that would add nobody is dropped (`1,1%` of 50 is one wave)."""
    ends: list[int] = []
    for s in sizes:
        want = s.count if s.count is not None else math.ceil((s.percent or 0) * n / 100 - 1e-9)
        end = min(n, max(want, 1))
        if end > (ends[-1] if ends else 0):
            ends.append(end)
    return ends


# --------------------------------------------------------------------------- halt rule


@dataclass(frozen=True, slots=True)
class Cmp:
    metric: str
    op: str
    value: float

    def eval(self, m: Mapping[str, float]) -> bool:
        a, b = m[self.metric], self.value
        return {
            ">": a > b,
            ">=": a >= b,
            "<": a < b,
            "<=": a <= b,
            "==": a == b,
            "!=": a != b,
        }[self.op]


@dataclass(frozen=True, slots=True)
class Not:
    arg: Rule

    def eval(self, m: Mapping[str, float]) -> bool:
        return not self.arg.eval(m)


@dataclass(frozen=True, slots=True)
class BoolOp:
    op: Literal["and", "or"]
    args: tuple[Rule, ...]

    def eval(self, m: Mapping[str, float]) -> bool:
        if self.op == "and":
            return all(a.eval(m) for a in self.args)
        return any(a.eval(m) for a in self.args)


Rule = Cmp | Not | BoolOp

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?%?)|(?P<op>>=|<=|==|!=|>|<)|(?P<par>[()])|(?P<word>[A-Za-z_]+))"
)


def _tokens(text: str) -> list[tuple[str, str, int]]:
    pos, out = 0, []
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise RolloutError(f"halt rule: unexpected {text[pos:].strip()[:20]!r} at {pos}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def _peek(self) -> tuple[str, str, int] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _fail(self, what: str) -> RolloutError:
        tok = self._peek()
        got = f"{tok[1]!r} at {tok[2]}" if tok else "the end"
        return RolloutError(f"halt rule: expected {what}, got {got}")

    def _word(self, w: str) -> bool:
        tok = self._peek()
        if tok is not None and tok[0] == "word" and tok[1].lower() == w:
            self.i += 1
            return True
        return False

    def parse(self) -> Rule:
        rule = self._or()
        if self._peek() is not None:
            raise self._fail("'and', 'or' or the end")
        return rule

    def _or(self) -> Rule:
        args = [self._and()]
        while self._word("or"):
            args.append(self._and())
        return args[0] if len(args) == 1 else BoolOp("or", tuple(args))

    def _and(self) -> Rule:
        args = [self._not()]
        while self._word("and"):
            args.append(self._not())
        return args[0] if len(args) == 1 else BoolOp("and", tuple(args))

    def _not(self) -> Rule:
        if self._word("not"):
            return Not(self._not())
        tok = self._peek()
        if tok is not None and tok == ("par", "(", tok[2]):
            self.i += 1
            inner = self._or()
            if self._peek() is None or self._peek()[1] != ")":  # type: ignore[index]
                raise self._fail("')'")
            self.i += 1
            return inner
        return self._cmp()

    def _cmp(self) -> Rule:
        tok = self._peek()
        if tok is None or tok[0] != "word" or tok[1] in ("and", "or", "not"):
            raise self._fail("a metric")
        metric = tok[1]
        if metric not in METRICS:
            raise RolloutError(
                f"halt rule: unknown metric {metric!r} at {tok[2]}; known: {', '.join(sorted(METRICS))}"
            )
        self.i += 1
        op = self._peek()
        if op is None or op[0] != "op":
            raise self._fail("a comparison (> >= < <= == !=)")
        self.i += 1
        num = self._peek()
        if num is None or num[0] != "num":
            raise self._fail("a number")
        self.i += 1
        text = num[1]
        if text.endswith("%"):
            if not metric.endswith("_rate"):
                raise RolloutError(
                    f"halt rule: {metric} is a count; a percentage compares with a rate "
                    f"({metric}_rate{op[1]}{text})"
                )
            value = float(text[:-1]) / 100
        else:
            value = float(text)
        return Cmp(metric, op[1], value)


@functools.lru_cache(maxsize=64)
def parse_rule(text: str) -> Rule:
    """The halt rule's syntax tree (RolloutError on a syntax error or an unknown metric)."""
    return _Parser(text).parse()


def rule_text(rule: Rule) -> str:
    if isinstance(rule, Cmp):
        return f"{rule.metric}{rule.op}{rule.value:g}"
    if isinstance(rule, Not):
        return f"not ({rule_text(rule.arg)})"
    return f" {rule.op} ".join(f"({rule_text(a)})" for a in rule.args)
