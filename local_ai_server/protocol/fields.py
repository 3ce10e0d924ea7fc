"""Field validation: typed accessors over one message's JSON object, and the text and identifier rules."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidField, PayloadTooLarge, RequestId

MODES = ("full", "stt", "llm", "tts")  # the values of a message's `mode` field

_INT_RE = re.compile(r"-?[0-9]{1,12}")
_SAFE_NAME_RE = re.compile(r"[^a-z0-9_]")
# C0 controls and DEL: never part of an identifier; in free text they become spaces (tab/newline stay).
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# json.loads turns a \ud800 escape into a lone surrogate: a str Python holds but no UTF-8 can encode.
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")
MAX_ID_CHARS = 256
MAX_PATH_CHARS = 4096
MAX_NAME_BYTES = 255  # longest file name POSIX file systems take


def clean_text(text: str) -> str:
    """Free text as the server uses it: control characters (NUL included) replaced by spaces."""
    return _TEXT_CONTROL_RE.sub(" ", text) if _TEXT_CONTROL_RE.search(text) else text


def _bad_unicode_at(value: Any, where: str, depth: int = 0) -> str | None:
    """The dotted name of the first key or string under `value` holding a lone surrogate, or None."""
    if isinstance(value, str):
        return where if _SURROGATE_RE.search(value) else None
    if depth > 64:
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{where}.{_SAFE_NAME_RE.sub('', str(key).lower())[:40]}" if where else str(key)
            if _SURROGATE_RE.search(key):
                return where or "a key"
            found = _bad_unicode_at(item, name, depth + 1)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _bad_unicode_at(item, f"{where}[{i}]", depth + 1)
            if found is not None:
                return found
    return None


def normalize_type(value: Any) -> str:
    """Lower-case, trim and map `-` to `_`, as the protocol prescribes."""
    return str(value).replace("\x00", "").strip().lower().replace("-", "_")


def _rid(value: Any) -> RequestId:
    """A raw JSON value as a request id, or None when it cannot be one (and so cannot be echoed)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -2**63 <= value < 2**64 else None
    if isinstance(value, str) and len(value) <= MAX_ID_CHARS and not _SURROGATE_RE.search(value):
        return value
    return None


class _Fields:
    """Typed accessors over one message's JSON object; errors carry the request id."""

    def __init__(self, obj: Mapping[str, Any], mtype: str) -> None:
        self.obj = obj
        self.mtype = mtype
        raw_rid = obj.get("request_id")
        self.request_id: RequestId = _rid(raw_rid)
        if raw_rid is not None and self.request_id is None:
            raise InvalidField(f"{mtype}.request_id must be a string or integer (of at most {MAX_ID_CHARS} "
                               "characters)")
        self.call_id = self.opt_id("call_id")

    def fail(self, msg: str) -> InvalidField:
        return InvalidField(f"{self.mtype}.{msg}", request_id=_rid(self.request_id), call_id=self.call_id
                            if hasattr(self, "call_id") else None)

    def opt_str(self, key: str, max_len: int | None = None) -> str | None:
        """A free-text field: control characters (NUL included) become spaces, as docs/protocol.md says."""
        value = self._raw_str(key, max_len)
        return None if value is None else clean_text(value)

    def opt_id(self, key: str, max_len: int = MAX_ID_CHARS) -> str | None:
        """An identifier or keyword (ids, modes, formats, tokens): refused if it holds a control character."""
        value = self._raw_str(key, max_len)
        if value is not None and _CONTROL_RE.search(value):
            raise self.fail(f"{key} must not contain control characters")
        return value

    def _raw_str(self, key: str, max_len: int | None) -> str | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "call_id":
            value = str(value)  # some engines send numeric call ids
        if not isinstance(value, str):
            raise self.fail(f"{key} must be a string")
        if max_len is not None and len(value) > max_len:
            raise PayloadTooLarge(
                f"{self.mtype}.{key} is longer than {max_len} characters", request_id=_rid(self.request_id)
            )
        return value

    def req_str(self, key: str, max_len: int | None = None, *aliases: str) -> str:
        for name in (key, *aliases):
            value = self.opt_str(name, max_len)
            if value is not None:
                return value
        raise self.fail(f"{key} is required")

    def opt_path(self, key: str, value: Any = None) -> str | None:
        """A model path: refused unless the OS could take it (no NUL, names of at most 255 bytes)."""
        if value is None:
            value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{key} must be a non-empty string")
        if len(value) > MAX_PATH_CHARS:
            raise PayloadTooLarge(f"{self.mtype}.{key} is longer than {MAX_PATH_CHARS} characters",
                                  request_id=_rid(self.request_id))
        if _CONTROL_RE.search(value):
            raise self.fail(f"{key} must not contain control characters")
        if any(len(part.encode("utf-8")) > MAX_NAME_BYTES for part in value.split("/")):
            raise self.fail(f"{key} has a name longer than {MAX_NAME_BYTES} bytes")
        if value.startswith("~") and not (value == "~" or value.startswith("~/")):
            raise self.fail(f"{key} must not name another user's home directory")
        return value

    def opt_int(self, key: str, lo: int, hi: int, *aliases: str) -> int | None:
        for name in (key, *aliases):
            value = self.obj.get(name)
            if value is None:
                continue
            if isinstance(value, bool):
                raise self.fail(f"{name} must be an integer")
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
                value = int(value.strip())
            if not isinstance(value, int):
                raise self.fail(f"{name} must be an integer")
            if not lo <= value <= hi:
                raise self.fail(f"{name} must be between {lo} and {hi}")
            return value
        return None

    def opt_float(self, key: str, lo: float, hi: float) -> float | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise self.fail(f"{key} must be a number between {lo:g} and {hi:g}")
        return float(value)

    def opt_choice(self, key: str, choices: tuple[str, ...]) -> str | None:
        value = self.opt_id(key, 32)
        if value is None:
            return None
        if value.strip().lower() not in choices:
            raise self.fail(f"{key} must be one of {', '.join(choices)}")
        return value.strip().lower()

    def opt_bool(self, key: str, default: bool = False) -> bool:
        value = self.obj.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, (int,)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise self.fail(f"{key} must be a boolean")

    def opt_mode(self, key: str = "mode") -> str | None:
        value = self.opt_id(key, 32)
        if value is None:
            return None
        mode = value.strip().lower()
        if mode not in MODES:
            raise self.fail(f"{key} must be one of {', '.join(MODES)}")
        return mode

    def opt_encoding(self, *keys: str) -> str | None:
        for key in keys:
            value = self.opt_id(key, 32)
            if value is not None:
                return value
        return None

