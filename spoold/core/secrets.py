"""Secrets: reading ``${secret:NAME}`` files safely, and masking secret values wherever spoold writes.

Pure: no global state. The daemon builds one ``SecretStore`` from the config and one ``Masker``
per job (or per daemon), and passes them to whatever writes.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import stat
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, quote_plus

from spoold.core.errors import SecretError

#: A secret's name is a file name in secrets_dir, never a path: no "/", no "." or ".." or dotfile.
#: Use with ``fullmatch``; ``spoold.core.job`` builds ``${secret:NAME}`` references from it.
SECRET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

#: The rule of SECRET_NAME in words, for messages.
NAME_RULE = (
    "a secret's name is a file name in secrets_dir, never a path: 1 to 128 letters, digits, "
    "'_', '.' or '-', not starting with '.' and without '/'"
)

#: A secret file holds one value (a token, a password, a PEM key), never a document.
MAX_SECRET_SIZE = 64 * 1024

#: The longest, in UTF-8 bytes, that a form of a secret (escaped, encoded) can be: JSON writes
#: a control character, one byte, as six (``\u0001``). What cuts a line must look this far past
#: the cut to see whole every form that starts before it.
MAX_FORM_SIZE = 6 * MAX_SECRET_SIZE

#: Field names whose values are secret; use with ``search`` (the name *ends* in one of these).
SECRET_FIELD = re.compile(r"(?:secret|password|api_key|api_token)\Z", re.IGNORECASE)

#: What a secret value is replaced with.
MASK = "***"

#: A secret shorter than this is still masked, but found inside ordinary words too ("ab" makes
#: "table" "t***le"), which gives it away by context: spoold warns when it reads one.
SHORT_SECRET = 4

# The job log is masked one line at a time, so a multi-line value is also masked line by line;
# shorter lines ("-----", "==") would mask ordinary output without protecting anything.
_MIN_LINE_LENGTH = 4

# Open flags: never follow a symlink planted in secrets_dir, never leak the descriptor into a
# job's process, and never block on a FIFO put where a secret file should be.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def is_secret_field(name: str) -> bool:
    """Whether a field of that name holds a secret (``token_secret``, ``DB_PASSWORD``, ...)."""
    return SECRET_FIELD.search(name) is not None


#: Wider than ``SECRET_FIELD``: the names whose values a message (a refusal, a config error)
#: never quotes. ``*token`` is masked nowhere else (a job's ``token`` may be anything), but an
#: error about one says its kind, not its value.
_UNQUOTED_FIELD = re.compile(r"(?:secret|password|api_key|api_token|token)\Z", re.IGNORECASE)


def is_unquoted_field(name: str) -> bool:
    """Whether a message about a field of that name must not quote its value."""
    return _UNQUOTED_FIELD.search(name) is not None


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_IFDIR: "a directory",
        stat.S_IFIFO: "a FIFO",
        stat.S_IFSOCK: "a socket",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
    }
    return kinds.get(stat.S_IFMT(mode), "not a regular file")


def _kind_at(path: Path) -> str | None:
    """What is at ``path`` if it is not a regular file; None if it is one or cannot be told."""
    try:
        mode = path.lstat().st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else _file_kind(mode)


class SecretAccessDenied(SecretError):
    """This process may not open secrets_dir or the secret's file (EACCES, EPERM)."""


class SecretStore:
    """Reads secrets from one file each in ``directory``, at call time (a rotated file is seen)."""

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory

    @property
    def directory(self) -> Path | None:
        """The configured secrets_dir, or None when the config has none."""
        return self._directory

    def read(self, name: str) -> str:
        """The value of secret ``name``, one trailing newline stripped; ``SecretError`` if unsafe."""
        if self._directory is None:
            raise SecretError(
                f"secret {name!r} cannot be read: no secrets_dir is configured; set secrets_dir "
                "in the config to a directory holding one file per secret (mode 0600)"
            )
        # fullmatch, not match with "$": "$" would also accept a name ending in "\n".
        if SECRET_NAME.fullmatch(name) is None:
            raise SecretError(
                f"secret name {name!r} is not a plain file name in {self._directory}: " + NAME_RULE
            )
        path = self._directory / name
        data = self._read_bytes(name, path)
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SecretError(
                f"secret {name!r}: {path} is not valid UTF-8 (bad byte at offset {exc.start}); "
                "save the file as UTF-8"
            ) from None
        # Exactly one line ending: editors add one, but further blank lines or spaces are data.
        if value.endswith("\r\n"):
            return value[:-2]
        if value.endswith("\n"):
            return value[:-1]
        return value

    def _read_bytes(self, name: str, path: Path) -> bytes:
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            if self._directory is not None and not self._directory.is_dir():
                raise SecretError(
                    f"secret {name!r}: secrets_dir {self._directory} does not exist or is not a "
                    "directory; create it (mode 0700) or fix secrets_dir in the config"
                ) from None
            raise SecretError(
                f"secret {name!r}: {path} does not exist; create it with the value and "
                f"chmod 600 {path}"
            ) from None
        except OSError as exc:
            # With O_NOFOLLOW, ELOOP means the last component is a symlink (dangling or not).
            if exc.errno == errno.ELOOP:
                raise SecretError(
                    f"secret {name!r}: {path} is a symbolic link, which spoold does not follow; "
                    f"replace it with a regular file and chmod 600 {path}"
                ) from None
            # A socket (ENXIO) or an unplugged device fails open itself: say what is there.
            kind = _kind_at(path)
            if kind is not None:
                raise SecretError(
                    f"secret {name!r}: {path} is {kind}, not a regular file; replace it with a "
                    f"regular file and chmod 600 {path}"
                ) from None
            # EACCES here is this user's lot (`spoold validate` run by a submitter), or a
            # secrets_dir the daemon's own user may not open: callers tell the two apart.
            denied = exc.errno in (errno.EACCES, errno.EPERM)
            raise (SecretAccessDenied if denied else SecretError)(
                f"secret {name!r}: cannot open {path}: {exc.strerror or exc}; check secrets_dir "
                "and the file"
            ) from None
        try:
            # Checked on the open descriptor, not the path, so a swap after the check is moot.
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SecretError(
                    f"secret {name!r}: {path} is {_file_kind(info.st_mode)}, not a regular file; "
                    f"replace it with a regular file and chmod 600 {path}"
                )
            mode = stat.S_IMODE(info.st_mode)
            if mode & 0o077:
                raise SecretError(
                    f"secret {name!r}: {path} has mode {mode:04o}, which lets group or others "
                    f"read or write it; run chmod 600 {path}"
                )
            if info.st_size > MAX_SECRET_SIZE:
                raise SecretError(
                    f"secret {name!r}: {path} is {info.st_size} bytes, larger than 64 KiB; a "
                    "secret file holds one value (a token, a password, a key)"
                )
            # One byte past the limit, in case the file grew after fstat.
            data = _read_at_most(fd, MAX_SECRET_SIZE + 1)
        except OSError as exc:
            raise SecretError(
                f"secret {name!r}: cannot read {path}: {exc.strerror or exc}"
            ) from None
        finally:
            os.close(fd)
        if len(data) > MAX_SECRET_SIZE:
            raise SecretError(
                f"secret {name!r}: {path} is larger than 64 KiB; a secret file holds one value "
                "(a token, a password, a key)"
            )
        return data


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


#: Up to this many forms, a text is searched for each in turn (memchr-fast, nothing to build);
#: past it, for the machine words that forms start with (``_Probe``), at a cost that does not
#: grow with their number: a base64-encoded or hex secret makes up to nine forms of one value.
_FEW_FORMS = 16

#: Word sizes the probe looks up, widest first, with the memoryview format of each.
_WORDS: tuple[tuple[int, Literal["Q", "I"]], ...] = ((8, "Q"), (4, "I"))


class _Probe:
    """Whether any of some byte strings occurs in data: a sure no, or a yes checked by search."""

    __slots__ = ("_searched", "_tables")

    def __init__(self, needles: Iterable[bytes]) -> None:
        needles = tuple(needles)
        self._searched = needles
        self._tables: list[tuple[int, Literal["Q", "I"], dict[int, list[bytes]]]] = []
        if len(needles) <= _FEW_FORMS:
            return
        searched: list[bytes] = []
        tables: dict[int, dict[int, list[bytes]]] = {size: {} for size, _ in _WORDS}
        for needle in needles:
            # Wherever a needle of 2*size-1 bytes or more sits, it covers a whole word of the
            # data at a multiple of size: one of the words at its first size offsets.
            size = next((size for size, _ in _WORDS if len(needle) >= 2 * size - 1), None)
            if size is None:
                searched.append(needle)
                continue
            for start in range(size):
                word = int.from_bytes(needle[start : start + size], sys.byteorder)
                tables[size].setdefault(word, []).append(needle)
        self._searched = tuple(searched)
        self._tables = [(size, kind, tables[size]) for size, kind in _WORDS if tables[size]]

    def occurs_in(self, data: bytes) -> bool:
        """Whether one of the needles occurs in ``data``."""
        if any(needle in data for needle in self._searched):
            return True
        for size, kind, table in self._tables:
            whole = len(data) - len(data) % size
            if not whole:
                continue
            words = memoryview(data)[:whole].cast(kind)
            if table.keys().isdisjoint(words):  # one look-up per word, in C
                continue
            found = table.keys() & set(words)
            if any(needle in data for word in found for needle in table[word]):
                return True
        return False


def _as_output(form: str) -> bytes | None:
    """``form``'s bytes in a job's raw output, None if output cannot hold it: output is decoded
    with ``surrogateescape``, so of lone surrogates only those stand for bytes."""
    try:
        return form.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


class _Finder:
    """The forms a Masker knows, and what finds them; built whole by each ``add``."""

    __slots__ = ("_forms", "_ordered", "_output", "_pattern", "_text")

    def __init__(self, forms: frozenset[str]) -> None:
        # Longest first, so that where several forms start at one position the longest wins.
        ordered = sorted(forms, key=lambda form: (-len(form), form))
        self._ordered = ordered
        # Compiled when first needed: most text holds no form, and compiling the forms of a
        # 64 KiB secret takes a second or more.
        self._pattern: re.Pattern[str] | None = None
        self._forms: tuple[str, ...] | None = None
        self._text: _Probe | None = None
        if len(ordered) <= _FEW_FORMS:
            self._forms = tuple(ordered)  # searched as they are: no text to encode
        else:
            self._text = _Probe(form.encode("utf-8", "surrogatepass") for form in ordered)
        raw = (_as_output(form) for form in ordered)
        self._output = _Probe(form for form in raw if form is not None)

    def in_text(self, text: str) -> bool:
        """Whether ``text`` may hold a form (no: it holds none)."""
        if self._forms is not None:
            return any(form in text for form in self._forms)
        assert self._text is not None
        return self._text.occurs_in(text.encode("utf-8", "surrogatepass"))

    def in_output(self, data: bytes) -> bool:
        """Whether the text ``data`` decodes to (UTF-8, ``surrogateescape``) holds a form."""
        # The bytes hold a form's bytes only where the text holds the form: a form starts with
        # no continuation byte, so what comes before it cannot take it in.
        return self._output.occurs_in(data)

    @property
    def pattern(self) -> re.Pattern[str]:
        """Finds every form, overlapping ones too (group 1 is the form)."""
        pattern = self._pattern
        if pattern is None:  # two threads may both compile it: the same pattern either way
            # The lookahead lets matches overlap, so mask_text can merge spans and leave no
            # fragment.
            alternatives = "|".join(re.escape(form) for form in self._ordered)
            pattern = self._pattern = re.compile(f"(?=({alternatives}))")
        return pattern


class Masker:
    """Replaces known secret values by ``***`` in text and data; safe to share between threads."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: frozenset[str] = frozenset()
        # The values added, then the forms derived from them (values()): in this order a
        # Masker given them derives the same forms and skips them when they come.
        self._added: tuple[str, ...] = ()
        self._derived: tuple[str, ...] = ()
        # Left out of values(): a Masker derives them again from the values, and they are the
        # bulk of the forms (nine of a 64 KiB secret are 0.8 MB) that a supervisor is sent.
        self._encoded: tuple[str, ...] = ()
        # Readers take this one reference without the lock: add() swaps in a whole new one.
        self._finder: _Finder | None = None
        self._longest = 0
        self.add_all(values)

    def add(self, value: str) -> None:
        """Mask ``value`` from now on: as it is, each line of it if it has several, and the
        forms a remote, an error message or a job turns it into (escaped, URL-encoded, base64,
        hex)."""
        self.add_all((value,))

    def add_all(self, values: Iterable[str]) -> None:
        """``add`` each of ``values``, with what finds them built once for all of them: built
        for each one, a Masker of 100 secrets took 254 ms to make (a supervisor makes its
        job's at each unit), and 20 took 10 ms."""
        fresh = [v for v in dict.fromkeys(values) if v not in self._values and v.strip()]
        if not fresh:
            return
        each = [(value, _registered_forms(value), _encodings(value)) for value in fresh]
        with self._lock:
            known = set(self._values)
            added, derived, encoded = list(self._added), list(self._derived), list(self._encoded)
            longest = self._longest
            for value, forms, encodings in each:
                if value in known:
                    continue
                its_derived = [form for form in forms if form not in known and form != value]
                known.update((value, *its_derived))
                its_encoded = [form for form in encodings if form not in known]
                known.update(its_encoded)
                added.append(value)
                derived += its_derived
                encoded += its_encoded
                for form in (value, *its_derived, *its_encoded):
                    longest = max(longest, len(form.encode("utf-8", "surrogatepass")))
            if len(known) == len(self._values):
                return
            self._values = frozenset(known)
            self._added, self._derived, self._encoded = tuple(added), tuple(derived), tuple(encoded)
            self._longest = longest
            self._finder = _Finder(self._values)

    def values(self) -> tuple[str, ...]:
        """What it masks (the values added first, then their escaped forms; not their base64
        and hex, which a Masker derives from the values): given to a Masker elsewhere (a
        job's supervisor), it masks the same."""
        return self._added + self._derived

    @property
    def longest_form(self) -> int:
        """The UTF-8 length of the longest value or form it masks (at most MAX_FORM_SIZE)."""
        return self._longest

    def __bool__(self) -> bool:
        """Whether any value is known (else mask_text changes nothing)."""
        return self._finder is not None

    def in_output(self, data: bytes) -> bool:
        """Whether a job's output ``data`` (UTF-8, any byte that is not as ``surrogateescape``
        decodes it) holds a value or a form of one: where it does not, ``mask_text`` would
        leave the text alone. At any number of values, no slower than a few searches."""
        finder = self._finder
        return finder is not None and finder.in_output(data)

    def mask_text(self, text: str) -> str:
        """``text`` with every occurrence of every known value replaced by ``***``."""
        finder = self._finder
        # Runs on every log line: nothing to mask costs one attribute read, and text that
        # holds nothing to mask a search or two, not the pattern (a try at each character).
        if finder is None or not finder.in_text(text):
            return text
        pieces: list[str] = []
        masked_to = 0  # text[:masked_to] is already copied or masked
        for match in finder.pattern.finditer(text):
            start, end = match.start(), match.end(1)
            if end <= masked_to:
                continue
            if start >= masked_to:
                pieces.append(text[masked_to:start])
                pieces.append(MASK)
            # An overlapping match extends the span the last "***" already stands for.
            masked_to = end
        if not pieces:
            return text
        pieces.append(text[masked_to:])
        return "".join(pieces)

    def mask_data(self, data: Any) -> Any:
        """A copy of nested dicts/lists with strings masked and secret-named fields set to ``***``."""
        if isinstance(data, str):
            return self.mask_text(data)
        if isinstance(data, dict):
            masked: dict[Any, Any] = {}
            for key, value in data.items():
                # Keys are masked too: a value must not leak by being used as a name.
                new_key = self.mask_text(key) if isinstance(key, str) else key
                if isinstance(key, str) and is_secret_field(key) and value is not None:
                    masked[new_key] = MASK
                else:
                    masked[new_key] = self.mask_data(value)
            return masked
        if isinstance(data, list):
            return [self.mask_data(item) for item in data]
        if isinstance(data, tuple):
            return tuple(self.mask_data(item) for item in data)
        return data

    def collect(self, document: Any) -> None:
        """Add the string values of secret-named fields, at any depth, so free text masks them."""
        self._collect(document, inside_secret=False)

    def _collect(self, data: Any, *, inside_secret: bool) -> None:
        if isinstance(data, str):
            if inside_secret:
                self.add(data)
        elif isinstance(data, dict):
            for key, value in data.items():
                secret = inside_secret or (isinstance(key, str) and is_secret_field(key))
                self._collect(value, inside_secret=secret)
        elif isinstance(data, list | tuple):
            for item in data:
                self._collect(item, inside_secret=inside_secret)


def _registered_forms(value: str) -> list[str]:
    """``value``, its lines if it has several, and how it reads once escaped or encoded:
    a fixed few forms of the whole value (not of each line), so the cost is bounded."""
    forms = [value]
    if "\n" in value or "\r" in value:
        for raw_line in value.splitlines():
            line = raw_line.strip()
            if len(line) >= _MIN_LINE_LENGTH:
                forms.append(line)
    forms.extend(encoded_forms(value))
    return list(dict.fromkeys(forms))


def _encodings(value: str) -> list[str]:
    """What a job shows of ``value`` encoded, where it differs from it: base64 (``base64``, an
    ``Authorization: Basic`` header; wrapped too) and hex, in either case, of its UTF-8 bytes."""
    # The encodings of a short secret are shorter still ("ab" is "YWI" in base64, "6162" in
    # hex) and would mask innocent text everywhere; the plain value is masked all the same.
    if len(value) < SHORT_SECRET:
        return []
    # A value from a job file may hold a lone surrogate (JSON's "\ud800"): no error here.
    data = value.encode("utf-8", "surrogatepass")
    forms = [*base64_forms(data), *wrapped_base64(data), data.hex(), data.hex().upper()]
    return [form for form in dict.fromkeys(forms) if form != value]


#: The widths base64 is wrapped at: ``base64`` and MIME (76), PEM and ``openssl base64`` (64).
_WRAPS = (76, 64)
#: The shortest last line of wrapped base64 that is masked: shorter ones would mask other
#: text; what such a line leaves to see is at most the secret's last 5 bytes.
_MIN_WRAPPED = 8


def wrapped_base64(data: bytes) -> list[str]:
    """The lines ``data``'s base64 takes when it is wrapped (``base64 key.pem``, ``echo
    "$KEY" | base64``: past 57 bytes) and ``data`` starts what was encoded: each line is masked
    on its own, as a log holds them. Of the last, only the characters of ``data``'s bits, as
    ``base64_forms`` keeps them. ``data`` inside longer wrapped base64 is not found: where its
    lines break depends on what came before it."""
    encoded = base64.b64encode(data).decode("ascii")
    own = encoded[: 8 * len(data) // 6]  # character i holds bits 6i to 6i+5
    lines: list[str] = []
    for width in _WRAPS:
        if len(own) > width:
            lines.extend(own[start : start + width] for start in range(0, len(own), width))
    return [line for line in lines if len(line) >= _MIN_WRAPPED]


_URL_SAFE = str.maketrans("+/", "-_")


def base64_forms(data: bytes) -> list[str]:
    """What base64 text shows of ``data`` wherever it sits in what was encoded: a 3-byte group
    becomes 4 characters, so ``data`` starting at byte 0, 1 or 2 of a group reads three ways.
    Of each, only the characters made of ``data``'s bits alone; the one at each end that also
    holds a neighbour's bits (or padding) differs with what is around, and is left to show at
    most 4 bits of ``data``'s first or last byte. In the standard and the URL-safe alphabet;
    padding is never part of them, so text with or without it is masked alike."""
    forms: list[str] = []
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + data).decode("ascii")
        # Character i holds bits 6i to 6i+5; data holds bits 8*offset to 8*(offset+len).
        first = -(-8 * offset // 6)
        end = 8 * (offset + len(data)) // 6
        middle = encoded[first:end]
        forms.extend((middle, middle.translate(_URL_SAFE)))
    return list(dict.fromkeys(forms))


_PERCENT = re.compile(r"%[0-9A-F]{2}")


def encoded_forms(value: str) -> list[str]:
    """The forms ``value`` takes in what others write, where they differ from it: quoted by
    Python's repr (an error message's ``{value!r}`` doubles each backslash), escaped in JSON
    (also PHP's ``\\/``), and URL-encoded (``%2B``, ``%20`` or ``+`` for a space), its hex
    digits in either case (RFC 3986 allows both; some clients write ``%2b``)."""
    as_json = json.dumps(value)[1:-1]
    encoded = (quote(value, safe=""), quote(value), quote_plus(value), quote_plus(value, safe="/"))
    forms = (
        repr(value)[1:-1],
        as_json,
        json.dumps(value, ensure_ascii=False)[1:-1],
        as_json.replace("/", "\\/"),
        *encoded,
        *(_PERCENT.sub(lambda m: m.group().lower(), form) for form in encoded),
    )
    return [form for form in dict.fromkeys(forms) if form != value]
