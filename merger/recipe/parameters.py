"""Merge parameters as mergekit reads them: checked when a recipe is made (names, types, sizes), and
resolved per tensor when it is planned (precedence source > slice > recipe; a scalar, a gradient
over a slice's layers, or `{filter, value}` entries matched against the tensor name)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from merger.limits import PARAMETER_DEPTH, PARAMETER_VALUES
from merger.methods.specs import METHODS, REQUIRED, Param


def check_setting_size(setting: Any, where: str) -> None:
    """Bound a setting before anything walks it: its values are evaluated for every tensor."""
    values, stack = 0, [(setting, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            stack += [(v, depth) for v in item.values()]
        elif isinstance(item, list | tuple):
            if depth + 1 > PARAMETER_DEPTH.value:
                raise PARAMETER_DEPTH.exceeded(where)
            stack += [(v, depth + 1) for v in item]
        else:
            values += 1
            if values > PARAMETER_VALUES.value:
                raise PARAMETER_VALUES.exceeded(where)


def check_settings(method: str, settings: Mapping[str, Any], where: str) -> None:
    """Names known to `method`, values of the right type and form, within their ranges."""
    spec = METHODS[method]
    for name, setting in settings.items():
        param = spec.param(name)
        if param is None:
            known = ", ".join(p.name for p in spec.params)
            raise ValueError(f"{where}: `{name}` is not a parameter of {method} (it takes {known})")
        for value in _values_in(setting, f"{where}: `{name}`"):
            _check_value(param, value, where)


def _values_in(setting: Any, where: str) -> list[Any]:
    """Every scalar a setting can evaluate to; a malformed setting is a ValueError."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if all(isinstance(e, dict) for e in setting):
            values = []
            for cond in setting:
                if set(cond) - {"filter", "value"} or "value" not in cond:
                    raise ValueError(f"{where}: each conditional entry is {{filter: NAME, value: V}}")
                if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                    raise ValueError(f"{where}: a filter is a piece of a tensor name, like self_attn")
                values += _values_in(cond["value"], where)
            return values
        if any(isinstance(e, (dict, list)) for e in setting) or not setting:
            raise ValueError(f"{where}: a gradient is a non-empty list of numbers")
        return setting
    return [setting]


def _check_value(param: Param, value: Any, where: str) -> None:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if param.kind is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: `{param.name}` is true or false, not {value!r}")
    if param.kind is int and not (numeric and float(value).is_integer()):
        raise ValueError(f"{where}: `{param.name}` is a whole number, not {value!r}")
    if param.kind is float and not numeric:
        raise ValueError(f"{where}: `{param.name}` is a number, not {value!r}")
    if param.within is not None and value not in param.within:
        raise ValueError(f"{where}: `{param.name}` is {value}, outside {param.within}: {param.within.why}")


def evaluate_setting(setting: Any, *, tensor_name: str, t: float, kind: type) -> Any:
    """One setting's value for one tensor (mergekit's rules): a scalar as written; a list of
    numbers is a gradient, linearly interpolated at `t` in [0, 1] (booleans: the one at or before
    `t`; whole numbers must land on one, else ValueError); `{filter, value}` entries give the
    first whose filter occurs in `tensor_name` (no filter or '*' matches any), None if none."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return kind(setting)
    if not setting:
        return None
    if all(isinstance(e, dict) for e in setting):
        for cond in setting:
            name_filter = cond.get("filter")
            if name_filter in (None, "*") or name_filter in tensor_name:
                return evaluate_setting(cond["value"], tensor_name=tensor_name, t=t, kind=kind)
        return None
    values = [kind(v) for v in setting]
    if kind is bool:
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    value = (1 - frac) * values[i0] + frac * values[i1]
    if kind is int:  # as mergekit: whole numbers interpolate, and must land on a whole number
        if not float(value).is_integer():
            raise ValueError(f"its gradient gives {value:g} here, not a whole number")
        return int(value)
    return value


def resolve_parameter(param: Param, scopes: Sequence[Mapping[str, Any]], *, tensor_name: str, t: float) -> Any:
    """The value of `param` for one tensor: the first scope, in precedence order (source, slice,
    recipe), whose setting yields a value; else the default. A required parameter with no value
    raises LookupError."""
    for scope in scopes:
        if param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name=tensor_name, t=t, kind=param.kind)
            if value is not None:
                return value
    if param.default is REQUIRED:
        raise LookupError(param.name)
    return param.default
