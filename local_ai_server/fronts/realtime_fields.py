"""Realtime client events' fields: the error a refused one raises, and typed getters that raise it (pure)."""

from __future__ import annotations

from typing import Any


class Invalid(Exception):
    """A client event that cannot be accepted as it is; its message goes to the client verbatim."""

    def __init__(self, message: str, *, code: str = "invalid_value", param: str | None = None,
                 event_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.event_id = event_id


def get_obj(obj: dict[str, Any], key: str, *, required: bool = False,
            param: str | None = None) -> dict[str, Any] | None:
    """An object field (None when absent, unless required)."""
    value = obj.get(key)
    if value is None:
        if required:
            raise Invalid(f"missing required parameter {key}", code="missing_required_parameter", param=param or key)
        return None
    if not isinstance(value, dict):
        raise Invalid(f"{key} must be an object", code="invalid_type", param=param or key)
    return value


def get_str(obj: dict[str, Any], key: str, *, required: bool = False, param: str | None = None) -> str | None:
    """A string field (None when absent, unless required)."""
    value = obj.get(key)
    if value is None:
        if required:
            raise Invalid(f"missing required parameter {key}", code="missing_required_parameter", param=param or key)
        return None
    if not isinstance(value, str):
        raise Invalid(f"{key} must be a string", code="invalid_type", param=param or key)
    return value


def get_bool(obj: dict[str, Any], key: str, default: bool, where: str) -> bool:
    """A boolean field, `default` when absent or null."""
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise Invalid(f"{key} must be true or false", code="invalid_type", param=f"{where}.{key}")
    return value


def get_int(obj: dict[str, Any], key: str, default: int | None, lo: int, hi: int, where: str | None = None, *,
            optional: bool = False) -> Any:
    """An integer field within [lo, hi]; None when absent and `optional`."""
    param = f"{where}.{key}" if where else key
    value = obj.get(key, default)
    if value is None:
        if optional:
            return None
        raise Invalid(f"missing required parameter {key}", code="missing_required_parameter", param=param)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise Invalid(f"{key} must be an integer from {lo} to {hi}", param=param)
    return value


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def short(value: object) -> str:
    """A value as an error message may quote it (40 characters at most)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
