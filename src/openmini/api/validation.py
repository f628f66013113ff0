"""Type and range checks on parsed JSON with OpenAI's error codes and wording.

Every check raises ``OpenAIError`` (400 ``invalid_request_error``) whose ``param`` is the
JSON path of the offending value (``messages[1].content``) and whose ``code`` is one of
OpenAI's: ``missing_required_parameter``, ``unknown_parameter``, ``invalid_type``,
``invalid_value``, ``decimal_above_max_value`` / ``decimal_below_min_value``,
``integer_above_max_value`` / ``integer_below_min_value``, ``empty_array``,
``array_above_max_length``, ``string_above_max_length`` (shared/API.md section 3).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

from openmini.serving.errors import OpenAIError, invalid_request

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string",
               list: "an array", dict: "an object", type(None): "null"}


def join(path: str, key: str | int) -> str:
    """Extend a JSON path: ``join("messages", 1) == "messages[1]"``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def type_name(value: Any) -> str:
    """OpenAI's name for a JSON value's type (``a string``, ``an object``, ...)."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Parse a request body that must be one JSON object.

    ``NaN`` / ``Infinity`` literals and invalid UTF-8 are rejected; nesting deeper than
    Python's recursion limit is rejected rather than crashing.

    Raises:
        OpenAIError: 400 with OpenAI's "could not parse the JSON body" message, or
            ``invalid_type`` when the JSON is not an object.
    """
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise invalid_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON.)") from None
    if not isinstance(body, dict):
        raise invalid_request(f"Invalid type for the request body: expected an object, but got "
                              f"{type_name(body)} instead.", code="invalid_type")
    return body


def invalid_type(path: str, expected: str, value: Any) -> OpenAIError:
    return invalid_request(f"Invalid type for '{path}': expected {expected}, but got "
                           f"{type_name(value)} instead.", param=path, code="invalid_type")


def invalid_value(path: str, value: Any, allowed: Iterable[str] | None = None,
                  reason: str | None = None) -> OpenAIError:
    """400 ``invalid_value``; lists the supported values when ``allowed`` is given."""
    shown = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)[:100]
    if allowed is not None:
        opts = [f"'{a}'" for a in allowed]
        listed = ", ".join(opts[:-1]) + f", and {opts[-1]}" if len(opts) > 1 else opts[0]
        msg = f"Invalid value for '{path}': '{shown}'. Supported values are: {listed}."
    else:
        msg = f"Invalid value for '{path}': {reason or repr(shown)}."
    return invalid_request(msg, param=path, code="invalid_value")


def unknown_parameter(path: str) -> OpenAIError:
    return invalid_request(f"Unknown parameter: '{path}'.", param=path, code="unknown_parameter")


def missing(path: str) -> OpenAIError:
    return invalid_request(f"Missing required parameter: '{path}'.", param=path,
                           code="missing_required_parameter")


def check_keys(obj: dict[str, Any], allowed: Iterable[str], path: str = "") -> None:
    """Reject keys not in ``allowed`` (OpenAI rejects unknown parameters at any depth)."""
    allowed = set(allowed)
    for key in obj:
        if key not in allowed:
            raise unknown_parameter(join(path, key))


def require(obj: dict[str, Any], key: str, path: str = "") -> Any:
    """``obj[key]``; a missing key or JSON null counts as missing."""
    value = obj.get(key)
    if value is None:
        raise missing(join(path, key))
    return value


def as_object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_type(path, "an object", value)
    return value


def as_array(value: Any, path: str, min_len: int = 0, max_len: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise invalid_type(path, "an array", value)
    if len(value) < min_len:
        if not value:
            raise invalid_request(f"Invalid '{path}': empty array. Expected an array with minimum "
                                  f"length {min_len}, but got an empty array instead.",
                                  param=path, code="empty_array")
        raise invalid_request(f"Invalid '{path}': array too short. Expected an array with "
                              f"minimum length {min_len}, but got an array with length "
                              f"{len(value)} instead.", param=path,
                              code="array_below_min_length")
    if max_len is not None and len(value) > max_len:
        raise invalid_request(f"Invalid '{path}': array too long. Expected an array with maximum "
                              f"length {max_len}, but got an array with length {len(value)} "
                              f"instead.", param=path, code="array_above_max_length")
    return value


def as_string(value: Any, path: str, max_len: int | None = None) -> str:
    if not isinstance(value, str):
        raise invalid_type(path, "a string", value)
    if max_len is not None and len(value) > max_len:
        raise invalid_request(f"Invalid '{path}': string too long. Expected a string with "
                              f"maximum length {max_len}, but got a string with length "
                              f"{len(value)} instead.", param=path,
                              code="string_above_max_length")
    return value


def as_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise invalid_type(path, "a boolean", value)
    return value


def as_number(value: Any, path: str, lo: float | None = None, hi: float | None = None) -> float:
    """A JSON number (int or float, not bool) within ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid_type(path, "a decimal", value)
    if isinstance(value, float) and math.isnan(value):
        raise invalid_type(path, "a decimal", value)
    shown = _show(value)
    if hi is not None and value > hi:
        raise invalid_request(f"Invalid '{path}': decimal above maximum value. Expected a value "
                              f"<= {_show(hi)}, but got {shown} instead.", param=path,
                              code="decimal_above_max_value")
    if lo is not None and value < lo:
        raise invalid_request(f"Invalid '{path}': decimal below minimum value. Expected a value "
                              f">= {_show(lo)}, but got {shown} instead.", param=path,
                              code="decimal_below_min_value")
    return float(value)


def as_int(value: Any, path: str, lo: int | None = None, hi: int | None = None) -> int:
    """A JSON integer (not bool, not a decimal) within ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(path, "an integer", value)
    if hi is not None and value > hi:
        raise invalid_request(f"Invalid '{path}': integer above maximum value. Expected a value "
                              f"<= {hi}, but got {_show(value)} instead.", param=path,
                              code="integer_above_max_value")
    if lo is not None and value < lo:
        raise invalid_request(f"Invalid '{path}': integer below minimum value. Expected a value "
                              f">= {lo}, but got {_show(value)} instead.", param=path,
                              code="integer_below_min_value")
    return value


def as_enum(value: Any, path: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise invalid_type(path, "a string", value)
    if value not in allowed:
        raise invalid_value(path, value, allowed)
    return value


def _show(x: float | int) -> str:
    """Numbers as OpenAI prints them (integral floats without ``.0``, huge ints shortened)."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    s = str(x)
    return s if len(s) <= 40 else s[:20] + "…"
