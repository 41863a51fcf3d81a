"""Subset filters in Consul's filter language, evaluated against endpoints.

A ``service-resolver`` subset is a filter such as ``Service.Meta.version == v2`` or
``"canary" in Service.Tags``. With Consul, the filter is passed to the health endpoint and
Consul evaluates it; for endpoints from the local config file, this module evaluates the
same expressions the same way (the go-bexpr operators Consul documents):

* ``==``, ``!=``, ``in``, ``not in``, ``contains``, ``not contains``, ``matches``,
  ``not matches``, ``is empty``, ``is not empty``
* ``and``, ``or``, ``not``, parentheses; values quoted (``"v2"``) or bare (``v2``)
* selectors ``Service.Meta.<key>``, ``Service.Tags``, ``Service.ID``, ``Service.Service``,
  ``Service.Address``, ``Service.Port``, ``Node.Node``

``compile_filter`` raises ``ValueError`` with the position of the problem.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["EndpointView", "compile_filter"]

_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<op>==|!=|\(|\))|(?P<word>[A-Za-z0-9_.:/\-*]+))'
)


@dataclass(frozen=True, slots=True)
class EndpointView:
    """What a filter can see of an endpoint."""

    service: str
    id: str
    address: str
    port: int
    node: str
    meta: Mapping[str, str]
    tags: tuple[str, ...]

    def select(self, selector: str) -> Any:
        """The value a selector names (``None`` for an unknown or missing one)."""
        if selector.startswith("Service.Meta."):
            return self.meta.get(selector[len("Service.Meta.") :])
        return {
            "Service.Meta": dict(self.meta),
            "Service.Tags": list(self.tags),
            "Service.ID": self.id,
            "Service.Service": self.service,
            "Service.Address": self.address,
            "Service.Port": str(self.port),
            "Node.Node": self.node,
        }.get(selector)


Predicate = Callable[[EndpointView], bool]


def compile_filter(text: str) -> Predicate:
    """A predicate for ``text``; ``ValueError`` if it is not a valid filter."""
    tokens = _tokenize(text)
    parser = _Parser(tokens, text)
    predicate = parser.expression()
    if parser.pos != len(tokens):
        raise ValueError(f"filter {text!r}: unexpected {tokens[parser.pos][1]!r}")
    return predicate


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"filter {text!r}: cannot read {text[pos : pos + 10]!r}")
        kind = match.lastgroup or ""
        value = match.group(kind)
        if kind == "str":
            value = bytes(value[1:-1], "utf-8").decode("unicode_escape")
        tokens.append((kind, value))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], text: str) -> None:
        self.tokens = tokens
        self.text = text
        self.pos = 0

    def _peek(self, offset: int = 0) -> tuple[str, str] | None:
        index = self.pos + offset
        return self.tokens[index] if index < len(self.tokens) else None

    def _word(self, *words: str) -> bool:
        token = self._peek()
        return token is not None and token[0] == "word" and token[1] in words

    def _take(self) -> tuple[str, str]:
        token = self._peek()
        if token is None:
            raise ValueError(f"filter {self.text!r}: ends too early")
        self.pos += 1
        return token

    def expression(self) -> Predicate:
        left = self._and()
        while self._word("or"):
            self._take()
            right = self._and()
            left = (lambda a, b: lambda e: a(e) or b(e))(left, right)
        return left

    def _and(self) -> Predicate:
        left = self._not()
        while self._word("and"):
            self._take()
            right = self._not()
            left = (lambda a, b: lambda e: a(e) and b(e))(left, right)
        return left

    def _not(self) -> Predicate:
        if self._word("not"):
            self._take()
            inner = self._not()
            return lambda e: not inner(e)
        return self._primary()

    def _primary(self) -> Predicate:
        token = self._peek()
        if token == ("op", "("):
            self._take()
            inner = self.expression()
            if self._take() != ("op", ")"):
                raise ValueError(f"filter {self.text!r}: missing ')'")
            return inner
        return self._match()

    def _value(self) -> str:
        kind, value = self._take()
        if kind not in ("str", "word"):
            raise ValueError(f"filter {self.text!r}: expected a value, found {value!r}")
        return value

    def _match(self) -> Predicate:
        first = self._value()
        if self._word("in") or (self._word("not") and self._peek(1) == ("word", "in")):
            negate = self._word("not")
            self.pos += 2 if negate else 1
            selector = self._value()
            return _negate(negate, lambda e: _contains(e.select(selector), first))
        selector = first
        kind, op = self._take()
        if (kind, op) == ("op", "=="):
            value = self._value()
            return lambda e: _text(e.select(selector)) == value
        if (kind, op) == ("op", "!="):
            value = self._value()
            return lambda e: _text(e.select(selector)) != value
        negate = op == "not"
        if negate:
            kind, op = self._take()
        if op == "contains":
            value = self._value()
            return _negate(negate, lambda e: _contains(e.select(selector), value))
        if op == "matches":
            pattern = re.compile(self._value())
            return _negate(negate, lambda e: pattern.search(_text(e.select(selector))) is not None)
        if op == "is":
            negate = self._word("not")
            if negate:
                self._take()
            if self._take() != ("word", "empty"):
                raise ValueError(f"filter {self.text!r}: expected 'empty'")
            return _negate(negate, lambda e: not e.select(selector))
        raise ValueError(f"filter {self.text!r}: unknown operator {op!r}")


def _negate(negate: bool, predicate: Predicate) -> Predicate:
    return (lambda e: not predicate(e)) if negate else predicate


def _contains(collection: Any, value: str) -> bool:
    if isinstance(collection, list | tuple | dict):
        return value in collection
    if isinstance(collection, str):
        return value in collection
    return False


def _text(value: Any) -> str:
    return "" if value is None else str(value)
