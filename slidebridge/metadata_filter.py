"""The ``custom_metadata`` list filter: a documented subset of PostgreSQL's SQL/JSON path language.

The real platform evaluates the filter as ``custom_metadata @? '<path>'`` (vendors/PLATFORM_API.md §8):
a run or item matches when the path yields at least one item. We have no PostgreSQL, so this module
parses and evaluates the subset below with PostgreSQL's semantics in its default **lax** mode.

Supported (anything else is a 422 naming what could not be parsed and the character position):

- the root ``$``; a filter that does not start with ``$`` gets ``$.`` prefixed (``study`` = ``$.study``),
  as the platform does; an optional leading ``lax`` mode keyword;
- accessors ``.field``, ``."quoted field"``, ``.*``, ``[*]``, ``[n]``, ``[n, m, ...]`` (n ≥ 0);
- filters ``? ( predicate )``, also nested and chained, where ``@`` is the item being tested and
  ``$`` the whole document;
- predicates: ``==``, ``!=`` (and ``<>``), ``<``, ``<=``, ``>``, ``>=`` between paths and literals
  (double-quoted strings, numbers, ``true``, ``false``, ``null``); ``&&``, ``||``, ``!( ... )``,
  parentheses; ``exists( path )``; ``like_regex "pattern"`` with optional ``flag "imsq"``;
  ``starts with "prefix"``. like_regex patterns use Python's syntax (POSIX bracket classes such
  as ``[[:digit:]]`` too) and may match for ``REGEX_BUDGET_S`` seconds in all per list request; a
  pattern that takes longer is a 422 saying so.

Lax mode as in PostgreSQL: an accessor applied to an array applies to its elements (one level);
``[*]``/``[0]`` on a non-array see the value itself; a missing field yields nothing instead of an
error; comparison operands are unwrapped one level; comparing values of different types is
*unknown* (never true, so ``!`` of it is unknown too), except that ``null != x`` is true. Filters keep
items whose predicate is true.

Not supported (422): ``strict`` mode, arithmetic, item methods (``.size()``, ``.type()`` ...),
``.**``, ``last`` and ranges in subscripts, ``$variables``, ``is unknown``, and a predicate at the
top level (``$.a == 1``): PostgreSQL's ``@?`` treats that as always matching, which is never what a
caller means, so we ask for ``$.a ? (@ == 1)`` instead.

Why hand-written: no maintained Python library implements PostgreSQL's SQL/JSON path dialect and
lax semantics; ``jsonpath-ng`` and ``jsonpath-python`` implement Goessner-style JSONPath, a different
language (no ``@?`` existence semantics, no ``like_regex``, different filter syntax and typing rules).
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from slidebridge.errors import ListQueryError

if TYPE_CHECKING:
    import regex

MAX_FILTER_LENGTH = 1000
# CPU seconds that one filter's like_regex matching may take in all, over every record of one list
# request. Ordinary patterns need milliseconds for thousands of records; a pattern that backtracks
# exponentially (``(a+)+$``) would otherwise hold the Lambda until its timeout.
REGEX_BUDGET_S = 2.0
# Bounds the parser's recursion (and so the evaluator's) whatever the input: 1000 characters of
# "((((" must be a 422, not a RecursionError.
_MAX_NESTING = 32

_PUNCTUATION = {"$", "@", ".", "[", "]", "(", ")", ",", "*", "?", "-", "+"}
_COMPARISONS = {"==", "!=", "<>", "<", "<=", ">", ">="}
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
# PostgreSQL rejects XQuery's "x" flag ("not implemented"), so do we. The values are re's, which the
# regex module shares.
_REGEX_FLAGS = {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE, "q": 0}
# PostgreSQL's regex engine knows POSIX classes inside brackets ([[:digit:]]); Python's re does not.
_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "blank": " \\t",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\s",
    "upper": "A-Z",
    "word": "\\w",
    "xdigit": "0-9A-Fa-f",
}
_POSIX_CLASS = re.compile(r"\[:([a-z]+):\]")


class MetadataFilterError(ListQueryError):
    """The ``custom_metadata`` filter cannot be parsed, or its like_regex is too slow (HTTP 422).

    ``position`` is 1-based.
    """

    def __init__(
        self,
        reason: str,
        *,
        text: str,
        position: int | None,
        error_type: str = "jsonpath_syntax",
        subject: str = "invalid custom_metadata filter",
    ) -> None:
        if position is None:
            message = f"{subject}: {reason}"
        elif position >= len(text):
            message = f"{subject} at character {position + 1} (the end): {reason}"
        else:
            message = f"{subject} at character {position + 1} (near {text[position : position + 16]!r}): {reason}"
        super().__init__(
            message,
            loc=("query", "custom_metadata"),
            error_type=error_type,
            input_value=text,
            ctx={"position": position + 1} if position is not None else None,
        )
        self.reason = reason
        self.position = None if position is None else position + 1


# --- the syntax tree ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Key:
    name: str


@dataclass(frozen=True, slots=True)
class AnyKey:
    """``.*``: every member value of an object."""


@dataclass(frozen=True, slots=True)
class AnyElement:
    """``[*]``: every element of an array."""


@dataclass(frozen=True, slots=True)
class Elements:
    indexes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Filter:
    predicate: Predicate


Step = Key | AnyKey | AnyElement | Elements | Filter


@dataclass(frozen=True, slots=True)
class Path:
    from_root: bool  # $ (the document) or @ (the item a filter is testing)
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class Literal:
    value: Any


Operand = Path | Literal


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: Operand
    right: Operand


class RegexBudget:
    """The matching time left to one filter's like_regex patterns, shared by all of them.

    Counts only time spent matching (not the store reads between records).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.spent = 0.0


@dataclass(frozen=True, slots=True)
class TimedPattern:
    """A like_regex pattern whose searches stop once the filter's ``RegexBudget`` is spent."""

    compiled: regex.Pattern[str]
    budget: RegexBudget
    text: str  # the whole filter and the pattern's position in it, for the 422
    position: int

    def search(self, value: str) -> bool:
        remaining = self.budget.seconds - self.budget.spent
        started = time.perf_counter()
        try:
            if remaining <= 0:
                raise TimeoutError
            return self.compiled.search(value, timeout=remaining) is not None
        except TimeoutError:
            raise MetadataFilterError(
                f"the like_regex pattern needed more than {self.budget.seconds:g} s of matching for this "
                "list; simplify it (nested repetition such as (a+)+ takes time exponential in the "
                "text's length)",
                text=self.text,
                position=self.position,
                error_type="jsonpath_regex_timeout",
                subject="custom_metadata filter too slow",
            ) from None
        finally:
            self.budget.spent += time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class LikeRegex:
    operand: Operand
    pattern: TimedPattern


@dataclass(frozen=True, slots=True)
class StartsWith:
    operand: Operand
    prefix: str


@dataclass(frozen=True, slots=True)
class Exists:
    path: Path


@dataclass(frozen=True, slots=True)
class And:
    left: Predicate
    right: Predicate


@dataclass(frozen=True, slots=True)
class Or:
    left: Predicate
    right: Predicate


@dataclass(frozen=True, slots=True)
class Not:
    operand: Predicate


Predicate = Compare | LikeRegex | StartsWith | Exists | And | Or | Not


# --- lexer -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # punctuation or operator text, or STRING, NUMBER, WORD, EOF
    text: str
    pos: int
    value: Any = None


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_" or ord(ch) > 127


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        two = text[i : i + 2]
        if ch == "$" and i + 1 < n and (_is_word_char(text[i + 1]) or text[i + 1] == '"'):
            raise MetadataFilterError(
                "variables ($name) are not supported; use $ for the document and @ inside a filter",
                text=text,
                position=i,
            )
        if two in _COMPARISONS or two in ("&&", "||"):
            tokens.append(_Token(two, two, i))
            i += 2
        elif ch in "<>!":
            tokens.append(_Token(ch, ch, i))
            i += 1
        elif ch == "=":
            raise MetadataFilterError("use == to compare for equality", text=text, position=i)
        elif ch in "&|":
            raise MetadataFilterError(f"use {ch * 2} for {'and' if ch == '&' else 'or'}", text=text, position=i)
        elif ch in _PUNCTUATION:
            tokens.append(_Token(ch, ch, i))
            i += 1
        elif ch == '"':
            value, end = _read_string(text, i)
            tokens.append(_Token("STRING", text[i:end], i, value))
            i = end
        elif ch == "'":
            raise MetadataFilterError('strings must be in double quotes ("...")', text=text, position=i)
        elif _is_word_char(ch):
            number = _NUMBER.match(text, i) if ch.isdigit() else None
            if number is not None and not (number.end() < n and _is_word_char(text[number.end()])):
                literal = number.group()
                tokens.append(_Token("NUMBER", literal, i, int(literal) if literal.isdigit() else float(literal)))
                i = number.end()
                continue
            end = i
            while end < n and _is_word_char(text[end]):
                end += 1
            tokens.append(_Token("WORD", text[i:end], i))
            i = end
        else:
            tokens.append(_Token(ch, ch, i))  # the parser says why it does not fit
            i += 1
    tokens.append(_Token("EOF", "", n))
    return tokens


def _read_string(text: str, start: int) -> tuple[str, int]:
    """A double-quoted string with JSON-path escapes; returns its value and the index after it."""
    out: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= n:
            break
        esc = text[i + 1]
        if esc == "u":
            code, i = _read_unicode_escape(text, i)
            out.append(code)
            continue
        if esc == "x":
            digits = text[i + 2 : i + 4]
            if len(digits) != 2 or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise MetadataFilterError("\\x must be followed by two hex digits", text=text, position=i)
            out.append(chr(int(digits, 16)))
            i += 4
            continue
        # As in PostgreSQL, an unknown escape stands for the character itself (so "\d" is "d";
        # a regex digit class is written "\\d").
        out.append(_ESCAPES.get(esc, esc))
        i += 2
    raise MetadataFilterError("unterminated string: missing the closing double quote", text=text, position=start)


def _read_unicode_escape(text: str, i: int) -> tuple[str, int]:
    """``\\uXXXX`` (joining a surrogate pair) or ``\\u{X...}``, starting at the backslash."""
    if text[i + 2 : i + 3] == "{":
        close = text.find("}", i + 3)
        digits = text[i + 3 : close] if close != -1 else ""
        if not 1 <= len(digits) <= 6 or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise MetadataFilterError("\\u{...} must hold 1 to 6 hex digits", text=text, position=i)
        code, end = int(digits, 16), close + 1
    else:
        digits = text[i + 2 : i + 6]
        if len(digits) != 4 or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise MetadataFilterError("\\u must be followed by four hex digits", text=text, position=i)
        code, end = int(digits, 16), i + 6
        low = text[end + 2 : end + 6]
        if 0xD800 <= code <= 0xDBFF and text[end : end + 2] == "\\u" and len(low) == 4:
            try:
                low_code = int(low, 16)
            except ValueError:
                low_code = 0
            if 0xDC00 <= low_code <= 0xDFFF:
                code = 0x10000 + ((code - 0xD800) << 10) + (low_code - 0xDC00)
                end += 6
    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        raise MetadataFilterError("\\u escape is not a valid Unicode character", text=text, position=i)
    return chr(code), end


# --- parser ------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str, regex_budget: RegexBudget) -> None:
        self.text = text
        self.regex_budget = regex_budget
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def peek(self, ahead: int = 1) -> _Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        if token.kind != "EOF":
            self.i += 1
        return token

    def fail(self, reason: str, token: _Token | None = None) -> MetadataFilterError:
        return MetadataFilterError(reason, text=self.text, position=(token or self.tok).pos)

    def expect(self, kind: str, what: str) -> _Token:
        if self.tok.kind != kind:
            raise self.fail(f"expected {what}, found {self._describe(self.tok)}")
        return self.take()

    @staticmethod
    def _describe(token: _Token) -> str:
        return "the end of the filter" if token.kind == "EOF" else repr(token.text)

    def is_word(self, word: str, token: _Token | None = None) -> bool:
        token = token or self.tok
        return token.kind == "WORD" and token.text == word

    # filter := ["lax"] path EOF
    def parse(self) -> Path:
        if self.tok.kind == "WORD" and self.tok.text in ("lax", "strict") and self.peek().kind == "$":
            if self.tok.text == "strict":
                raise self.fail("strict mode is not supported; filters are evaluated in lax mode (the default)")
            self.take()
        if self.tok.kind == "$":
            self.take()
            path = Path(from_root=True, steps=self.parse_steps())
        elif self.tok.kind in ("WORD", "STRING"):
            if self.is_word("exists") and self.peek().kind == "(":
                raise self.fail("exists(...) is a predicate; to match documents that have a field, write $.field")
            # A bare root field: the platform prefixes "$." (so "study" means "$.study").
            steps = [self.parse_key(self.take())]
            path = Path(from_root=True, steps=(*steps, *self.parse_steps()))
        elif self.tok.kind == "@":
            raise self.fail("@ is only allowed inside a filter ? (...); start the path with $")
        elif self.tok.kind == "EOF":
            raise self.fail("the filter is empty; give a path such as $.study")
        else:
            raise self.fail(f"expected a path starting with $ or a field name, found {self._describe(self.tok)}")
        if self.tok.kind in _COMPARISONS or self.tok.kind in ("&&", "||") or self.is_word("like_regex"):
            raise self.fail(
                "a predicate at the top level always matches under @?; "
                'filter with ? instead, e.g. $.study ? (@ == "high")'
            )
        if self.tok.kind != "EOF":
            raise self.fail(self._unexpected_after_path())
        return path

    def _unexpected_after_path(self) -> str:
        found = self._describe(self.tok)
        if self.tok.kind in ("-", "+", "*", "/", "%"):
            return f'arithmetic is not supported (found {found}); quote field names holding such characters: ."a-b"'
        if self.tok.kind == "WORD":
            return f"unexpected {found} after the path; a filter is written ? (...)"
        return f"unexpected {found} after the path"

    def parse_key(self, token: _Token) -> Key:
        if token.kind == "STRING":
            return Key(token.value)
        if self.tok.kind == "(":
            raise self.fail(f"item methods such as .{token.text}() are not supported", token)
        return Key(token.text)

    # steps := ( "." key | "." "*" | "[" "*" "]" | "[" n ("," n)* "]" | "?" "(" predicate ")" )*
    def parse_steps(self) -> tuple[Step, ...]:
        steps: list[Step] = []
        while True:
            if self.tok.kind == ".":
                self.take()
                if self.tok.kind in ("WORD", "STRING"):
                    steps.append(self.parse_key(self.take()))
                elif self.tok.kind == "*":
                    self.take()
                    if self.tok.kind == "*":
                        raise self.fail(".** (any level) is not supported; name the levels or use .* and [*]")
                    steps.append(AnyKey())
                elif self.tok.kind == "NUMBER":
                    raise self.fail('a field name that starts with a digit must be quoted: ."2024"')
                else:
                    raise self.fail(f"expected a field name after '.', found {self._describe(self.tok)}")
            elif self.tok.kind == "[":
                steps.append(self.parse_subscript())
            elif self.tok.kind == "?":
                self.take()
                self.expect("(", "'(' after '?'")
                predicate = self.parse_predicate()
                self.expect(")", "')' to close the filter")
                steps.append(Filter(predicate))
            else:
                return tuple(steps)

    def parse_subscript(self) -> Step:
        self.take()  # "["
        if self.tok.kind == "*":
            self.take()
            self.expect("]", "']' after '[*'")
            return AnyElement()
        indexes: list[int] = []
        while True:
            token = self.tok
            if token.kind == "NUMBER" and isinstance(token.value, int):
                indexes.append(self.take().value)
            elif self.is_word("last"):
                raise self.fail("'last' in subscripts is not supported")
            elif token.kind == "-":
                raise self.fail("negative array indexes are not supported")
            else:
                raise self.fail(f"expected an array index (0, 1, ...) or *, found {self._describe(token)}")
            if self.is_word("to"):
                raise self.fail("index ranges (n to m) are not supported; list the indexes: [0, 1, 2]")
            if self.tok.kind == ",":
                self.take()
                continue
            self.expect("]", "']' or ',' in the subscript")
            return Elements(tuple(indexes))

    # predicate := and ("||" and)*
    def parse_predicate(self) -> Predicate:
        self.depth += 1
        if self.depth > _MAX_NESTING:
            raise self.fail(f"the filter is nested more than {_MAX_NESTING} levels deep")
        left = self.parse_and()
        while self.tok.kind == "||":
            self.take()
            left = Or(left, self.parse_and())
        self.depth -= 1
        return left

    # and := unary ("&&" unary)*
    def parse_and(self) -> Predicate:
        left = self.parse_unary()
        while self.tok.kind == "&&":
            self.take()
            left = And(left, self.parse_unary())
        return left

    # unary := "!" ( "(" predicate ")" | exists ) | primary
    def parse_unary(self) -> Predicate:
        if self.tok.kind != "!":
            return self.parse_primary()
        self.take()
        if self.tok.kind != "(" and not (self.is_word("exists") and self.peek().kind == "("):
            raise self.fail("! must be followed by a parenthesised predicate: !(@.a == 1)")
        return Not(self.parse_primary())

    # primary := "(" predicate ")" | "exists" "(" path ")" | operand (cmp operand | like_regex | starts with)
    def parse_primary(self) -> Predicate:
        if self.tok.kind == "(":
            self.take()
            predicate = self.parse_predicate()
            self.expect(")", "')'")
            return predicate
        if self.is_word("exists") and self.peek().kind == "(":
            self.take()
            self.take()
            start = self.tok
            operand = self.parse_operand()
            if not isinstance(operand, Path):
                raise self.fail("exists(...) takes a path such as @.field", start)
            self.expect(")", "')' to close exists(")
            return Exists(operand)
        left = self.parse_operand()
        token = self.tok
        if token.kind in _COMPARISONS:
            self.take()
            return Compare("!=" if token.kind == "<>" else token.kind, left, self.parse_operand())
        if self.is_word("like_regex"):
            self.take()
            return LikeRegex(left, self.parse_regex())
        if self.is_word("starts") and self.is_word("with", self.peek()):
            self.take()
            self.take()
            prefix = self.expect("STRING", 'a double-quoted string after "starts with"')
            return StartsWith(left, prefix.value)
        if self.is_word("is"):
            raise self.fail("'is unknown' is not supported")
        if token.kind in ("-", "+", "*", "/", "%"):
            raise self.fail("arithmetic is not supported")
        if token.kind == "=":
            raise self.fail("use == to compare for equality")
        raise self.fail(
            f"expected a comparison (==, !=, <, <=, >, >=), like_regex or starts with, "
            f"found {self._describe(token)}; to test that a field exists, use exists(@.field)"
        )

    def parse_regex(self) -> TimedPattern:
        pattern_token = self.expect("STRING", 'a double-quoted pattern after like_regex, e.g. like_regex "^ab"')
        flags = 0
        literal = False
        if self.is_word("flag"):
            self.take()
            flag_token = self.expect("STRING", 'double-quoted flags after flag, e.g. flag "i"')
            for letter in flag_token.value:
                if letter not in _REGEX_FLAGS:
                    raise self.fail(f"unknown like_regex flag {letter!r}; allowed: i, s, m, q", flag_token)
                flags |= _REGEX_FLAGS[letter]
                literal = literal or letter == "q"
        source = re.escape(pattern_token.value) if literal else _posix_classes(pattern_token.value)
        # The regex module (re's syntax, version 0) rather than re: re cannot stop a search, and a
        # caller's pattern can backtrack for minutes. Imported here: most filters have no like_regex.
        import regex  # noqa: PLC0415

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "possible nested set": fine for our patterns
                compiled = regex.compile(source, flags | regex.VERSION0)
        except regex.error as exc:
            raise self.fail(f"invalid regular expression: {exc}", pattern_token) from None
        return TimedPattern(compiled, self.regex_budget, self.text, pattern_token.pos)

    # operand := "@" steps | "$" steps | string | number | true | false | null
    def parse_operand(self) -> Operand:
        token = self.tok
        if token.kind in ("@", "$"):
            self.take()
            return Path(from_root=token.kind == "$", steps=self.parse_steps())
        if token.kind in ("STRING", "NUMBER"):
            self.take()
            return Literal(token.value)
        if token.kind in ("-", "+") and self.peek().kind == "NUMBER":
            self.take()
            number = self.take().value
            return Literal(-number if token.kind == "-" else number)
        if token.kind == "WORD":
            words = {"true": True, "false": False, "null": None}
            if token.text in words:
                self.take()
                return Literal(words[token.text])
            raise self.fail(
                f"unexpected word {token.text!r}: strings must be in double quotes, "
                f"and fields inside a filter start with @ (e.g. @.{token.text})"
            )
        raise self.fail(
            "expected a value: @, $, a double-quoted string, a number, true, false or null; "
            f"found {self._describe(token)}"
        )


def _posix_classes(pattern: str) -> str:
    """Rewrite POSIX bracket classes (``[[:digit:]]``, ``[^[:space:]x]``) into Python ``re`` ranges (ASCII)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if ch != "[":
            out.append(ch)
            i += 1
            continue
        # A bracket expression: "[", optional "^", a leading "]" is literal, up to the closing "]".
        j = i + 1
        if j < n and pattern[j] == "^":
            j += 1
        if j < n and pattern[j] == "]":
            j += 1
        parts = [pattern[i:j]]
        while j < n and pattern[j] != "]":
            posix = _POSIX_CLASS.match(pattern, j)
            if posix is not None and posix.group(1) in _POSIX_CLASSES:
                parts.append(_POSIX_CLASSES[posix.group(1)])
                j = posix.end()
            elif pattern[j] == "\\":
                parts.append(pattern[j : j + 2])
                j += 2
            else:
                parts.append(pattern[j])
                j += 1
        out.append("".join(parts))
        i = j
    return "".join(out)


# --- evaluation (lax mode) ---------------------------------------------------------------------


class _Truth(Enum):
    FALSE = 0
    TRUE = 1
    UNKNOWN = 2


def _apply(step: Step, item: Any, root: Any) -> list[Any]:
    if isinstance(step, Key):
        if isinstance(item, dict):
            return [item[step.name]] if step.name in item else []
        if isinstance(item, list):  # lax: applies to the elements (one level)
            return [e[step.name] for e in item if isinstance(e, dict) and step.name in e]
        return []
    if isinstance(step, AnyKey):
        if isinstance(item, dict):
            return list(item.values())
        if isinstance(item, list):
            return [v for e in item if isinstance(e, dict) for v in e.values()]
        return []
    if isinstance(step, AnyElement):
        return list(item) if isinstance(item, list) else [item]  # lax: a non-array acts as [item]
    if isinstance(step, Elements):
        elements = item if isinstance(item, list) else [item]
        return [elements[i] for i in step.indexes if i < len(elements)]  # lax: out of range → nothing
    candidates = item if isinstance(item, list) else [item]  # Filter; lax: tests the elements
    return [c for c in candidates if _evaluate(step.predicate, c, root) is _Truth.TRUE]


def _path_items(path: Path, current: Any, root: Any) -> list[Any]:
    items = [root if path.from_root else current]
    for step in path.steps:
        items = [out for item in items for out in _apply(step, item, root)]
    return items


def _operand_items(operand: Operand, current: Any, root: Any) -> list[Any]:
    if isinstance(operand, Literal):
        return [operand.value]
    # lax: comparison operands are unwrapped one level
    items: list[Any] = []
    for item in _path_items(operand, current, root):
        if isinstance(item, list):
            items.extend(item)
        else:
            items.append(item)
    return items


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "container"


def _compare(op: str, left: Any, right: Any) -> _Truth:
    """One pair, as PostgreSQL's compareItems does."""
    left_type, right_type = _json_type(left), _json_type(right)
    if left_type != right_type:
        if "null" in (left_type, right_type):
            return _Truth.TRUE if op == "!=" else _Truth.FALSE
        return _Truth.UNKNOWN
    if left_type == "container":
        return _Truth.UNKNOWN
    # Strings compare by code point (PostgreSQL compares jsonpath strings that way too).
    cmp = 0 if left_type == "null" else (left > right) - (left < right)
    result = {
        "==": cmp == 0,
        "!=": cmp != 0,
        "<": cmp < 0,
        "<=": cmp <= 0,
        ">": cmp > 0,
        ">=": cmp >= 0,
    }[op]
    return _Truth.TRUE if result else _Truth.FALSE


def _any_pair(lefts: list[Any], test: Callable[[Any], _Truth]) -> _Truth:
    """Lax existential semantics: true as soon as one pair is true, else unknown if one was unknown."""
    unknown = False
    for left in lefts:
        result = test(left)
        if result is _Truth.TRUE:
            return _Truth.TRUE
        unknown = unknown or result is _Truth.UNKNOWN
    return _Truth.UNKNOWN if unknown else _Truth.FALSE


def _evaluate(predicate: Predicate, current: Any, root: Any) -> _Truth:
    if isinstance(predicate, And):
        left = _evaluate(predicate.left, current, root)
        if left is _Truth.FALSE:
            return left
        right = _evaluate(predicate.right, current, root)
        if right is _Truth.FALSE:
            return right
        return _Truth.UNKNOWN if _Truth.UNKNOWN in (left, right) else _Truth.TRUE
    if isinstance(predicate, Or):
        left = _evaluate(predicate.left, current, root)
        if left is _Truth.TRUE:
            return left
        right = _evaluate(predicate.right, current, root)
        if right is _Truth.TRUE:
            return right
        return _Truth.UNKNOWN if _Truth.UNKNOWN in (left, right) else _Truth.FALSE
    if isinstance(predicate, Not):
        inner = _evaluate(predicate.operand, current, root)
        return {_Truth.TRUE: _Truth.FALSE, _Truth.FALSE: _Truth.TRUE, _Truth.UNKNOWN: _Truth.UNKNOWN}[inner]
    if isinstance(predicate, Exists):
        return _Truth.TRUE if _path_items(predicate.path, current, root) else _Truth.FALSE
    if isinstance(predicate, Compare):
        rights = _operand_items(predicate.right, current, root)
        lefts = _operand_items(predicate.left, current, root)
        return _any_pair(lefts, lambda left: _any_pair(rights, lambda right: _compare(predicate.op, left, right)))
    if isinstance(predicate, LikeRegex):
        pattern = predicate.pattern
        return _any_pair(
            _operand_items(predicate.operand, current, root),
            lambda v: (_Truth.TRUE if pattern.search(v) else _Truth.FALSE) if isinstance(v, str) else _Truth.UNKNOWN,
        )
    prefix = predicate.prefix  # StartsWith
    return _any_pair(
        _operand_items(predicate.operand, current, root),
        lambda v: (_Truth.TRUE if v.startswith(prefix) else _Truth.FALSE) if isinstance(v, str) else _Truth.UNKNOWN,
    )


# --- the public interface ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetadataFilter:
    """A parsed ``custom_metadata`` filter; ``matches`` is ``custom_metadata @? path``."""

    source: str
    path: Path

    def matches(self, metadata: dict[str, Any] | None) -> bool:
        """True when the path yields at least one item; absent metadata (SQL NULL) never matches."""
        if metadata is None:
            return False
        return bool(_path_items(self.path, metadata, metadata))


def parse_metadata_filter(text: str, *, regex_budget_s: float = REGEX_BUDGET_S) -> MetadataFilter:
    """Parse a filter; raises ``MetadataFilterError`` (a 422) saying what failed and where.

    Its like_regex patterns may match for ``regex_budget_s`` seconds in all; past that, ``matches``
    raises ``MetadataFilterError`` too. Parse one filter per request: the budget is the filter's.
    """
    if len(text) > MAX_FILTER_LENGTH:
        raise MetadataFilterError(
            f"the filter is {len(text)} characters long; at most {MAX_FILTER_LENGTH} are allowed",
            text=text[:MAX_FILTER_LENGTH],
            position=None,
        )
    return MetadataFilter(source=text, path=_Parser(text, RegexBudget(regex_budget_s)).parse())
