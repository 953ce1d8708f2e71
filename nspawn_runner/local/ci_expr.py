"""GitLab's CI/CD expressions (`rules:if`, `only:variables`, `workflow:rules:if`), with the
semantics of its lexer and evaluator (lib/gitlab/ci/pipeline/expression): `$VAR`, "..." and
'...' strings without escapes, `/regex/flags`, `null`, `==`, `!=`, `=~`, `!~`, `&&`, `||` and
parentheses; comparisons bind tighter than `&&`, which binds tighter than `||`.

Values follow Ruby: `&&`/`||` return one of their operands (an empty string is true there),
and only the final result is tested with `present?` (nil, false and blank strings are false).
`=~` with a right operand that is a string, not a /pattern/, tests whether the left text is
a substring of it, as GitLab's `String#scan` does. An error while evaluating makes the whole
expression false, as in GitLab; a syntax error is a configuration error."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

MAX_TOKENS = 100


class ExprSyntaxError(ValueError):
    """The expression does not parse (GitLab: "invalid expression syntax")."""


class _EvalError(Exception):
    pass


@dataclass(frozen=True)
class Regex:
    source: str  # as written, "/.../flags"
    compiled: re.Pattern[str]


Value = str | bool | Regex | None

# Lexemes in GitLab's order; each is tried at the current position.
_LEXEMES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("(", re.compile(r"\(")),
    (")", re.compile(r"\)")),
    ("var", re.compile(r"\$(?P<name>[A-Za-z0-9_]+)")),
    ("str", re.compile(r"\"(?P<s1>.*?)\"|'(?P<s2>.*?)'")),
    ("pattern", re.compile(r"/(?:[^/]|\\/)+[^\\]/[ismU]*")),
    ("null", re.compile(r"null")),
    ("==", re.compile(r"==")),
    ("=~", re.compile(r"=~")),
    ("!=", re.compile(r"!=")),
    ("!~", re.compile(r"!~")),
    ("&&", re.compile(r"&&")),
    ("||", re.compile(r"\|\|")),
)
_COMPARISONS = frozenset({"==", "!=", "=~", "!~"})
_RUBY_REGEX = re.compile(r"^/(?P<body>.*)/(?P<flags>[ismU]*)$", re.S)
# RE2 (GitLab's engine) has neither lookaround nor backreferences; Python's re has both.
_NOT_RE2 = re.compile(r"\(\?<?[=!]|\\[1-9]")


def compile_regex(text: str) -> Regex | None:
    """`/body/flags` as GitLab's untrusted-regexp syntax, or None if it is not one."""
    m = _RUBY_REGEX.match(text)
    if not m:
        return None
    body, flags = m.group("body"), m.group("flags")
    if "U" in flags or _NOT_RE2.search(body):
        return None
    py_flags = re.ASCII  # RE2's \w, \d, \s and \b are ASCII
    for flag, value in (("i", re.I), ("m", re.M), ("s", re.S)):
        if flag in flags:
            py_flags |= value
    try:
        return Regex(text, re.compile(body.replace(r"\z", r"\Z"), py_flags))
    except re.error:
        return None


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str


def tokenize(expression: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while len(tokens) < MAX_TOKENS:
        while pos < len(expression) and expression[pos].isspace():
            pos += 1
        if pos >= len(expression):
            return tokens
        for kind, pattern in _LEXEMES:
            m = pattern.match(expression, pos)
            if m:
                if kind == "var":
                    text = m.group("name")
                elif kind == "str":
                    text = m.group("s1") if m.group("s1") is not None else m.group("s2")
                else:
                    text = m.group(0)
                if kind == "pattern":
                    unescaped = text.replace("\\/", "/")
                    if compile_regex(unescaped) is None:
                        raise ExprSyntaxError(f"invalid regular expression {text}")
                    text = unescaped
                tokens.append(_Token(kind, text))
                pos = m.end()
                break
        else:
            raise ExprSyntaxError(f"unknown lexeme at {expression[pos:pos + 20]!r}")
    raise ExprSyntaxError(f"more than {MAX_TOKENS} tokens")


@dataclass(frozen=True)
class _Node:
    kind: str
    text: str = ""
    left: _Node | None = None
    right: _Node | None = None


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos].kind if self.pos < len(self.tokens) else None

    def binary(self, level: int) -> _Node:
        if level == 0:
            return self.primary()
        ops = ({"||"}, {"&&"}, _COMPARISONS)[3 - level]
        node = self.binary(level - 1)
        while self.peek() in ops:
            op = self.tokens[self.pos].kind
            self.pos += 1
            node = _Node(op, left=node, right=self.binary(level - 1))
        return node

    def primary(self) -> _Node:
        kind = self.peek()
        if kind is None:
            raise ExprSyntaxError("the expression ends early")
        token = self.tokens[self.pos]
        self.pos += 1
        if kind == "(":
            node = self.binary(3)
            if self.peek() != ")":
                raise ExprSyntaxError("unmatched parenthesis")
            self.pos += 1
            return node
        if kind in ("var", "str", "pattern", "null"):
            return _Node(kind, token.text)
        raise ExprSyntaxError(f"unexpected {token.text!r}")


def parse(expression: str) -> _Node:
    if not isinstance(expression, str):
        raise ExprSyntaxError("the expression must be a string")
    parser = _Parser(tokenize(expression))
    if not parser.tokens:
        raise ExprSyntaxError("the expression is empty")
    node = parser.binary(3)
    if parser.pos != len(parser.tokens):
        raise ExprSyntaxError(f"unexpected {parser.tokens[parser.pos].text!r}")
    return node


def _ruby_truthy(value: Value) -> bool:
    return value is not None and value is not False


def _ruby_to_s(value: Value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Regex):
        return value.source
    return value


def _evaluate(node: _Node, variables: Mapping[str, str]) -> Value:
    kind = node.kind
    if kind == "var":
        return variables.get(node.text)
    if kind == "str":
        return node.text
    if kind == "null":
        return None
    if kind == "pattern":
        regex = compile_regex(node.text)
        assert regex is not None  # checked by the lexer
        return regex
    assert node.left is not None and node.right is not None
    if kind in ("=~", "!~"):
        text = _ruby_to_s(_evaluate(node.left, variables))
        pattern = _evaluate(node.right, variables)
        if not _ruby_truthy(pattern):
            return kind == "!~"
        if isinstance(pattern, str):
            # A string holding "/regex/" is a pattern; any other string is searched for text.
            pattern = compile_regex(pattern.replace("\\/", "/")) or pattern
        if isinstance(pattern, Regex):
            found = pattern.compiled.search(text) is not None
        elif isinstance(pattern, str):
            found = text in pattern
        else:
            raise _EvalError  # `true` has no `scan`
        return found if kind == "=~" else not found
    if kind in ("==", "!="):
        left, right = _evaluate(node.left, variables), _evaluate(node.right, variables)
        return (left == right) if kind == "==" else (left != right)
    left = _evaluate(node.left, variables)
    if kind == "&&":
        return _evaluate(node.right, variables) if _ruby_truthy(left) else left
    return left if _ruby_truthy(left) else _evaluate(node.right, variables)


def _present(value: Value) -> bool:
    if isinstance(value, str):
        return value.strip() != ""
    return _ruby_truthy(value)


def truthful(expression: str, variables: Mapping[str, str]) -> bool:
    """Whether GitLab considers `expression` true. Raises ExprSyntaxError if it does not parse."""
    tree = parse(expression)
    try:
        return _present(_evaluate(tree, variables))
    except _EvalError:
        return False
