"""Input types a node can declare: primitive widgets, opaque sockets and engine-filled hidden values.

Each spec knows three things: how it looks in ComfyUI's `/object_info` (`[TYPE, options]`), which linked
output types it accepts, and how a constant from a prompt is converted and checked. Conversion follows
ComfyUI's validation where that is sound and is stricter where ComfyUI silently corrupts values:

| type    | accepted constants                                                 | rejected                   |
|---------|--------------------------------------------------------------------|----------------------------|
| INT     | int; integral float (12.0); numeric string ("12", "12.0")          | bool, 12.5, "abc", None    |
| FLOAT   | int, float, numeric string; always returned as float               | bool, NaN/inf, "abc", None |
| STRING  | str; int/float become their decimal text (ComfyUI does `str(v)`)   | bool, None, lists, dicts   |
| BOOLEAN | bool; "true"/"false" (any case); 0 and 1                           | other strings and numbers  |
| COMBO   | a value equal to one of the options (no conversion)               | anything else              |

ComfyUI accepts `True` for an INT (Python's `int(True) == 1`) and truncates 12.5 to 12; both hide mistakes
in hand-written prompts, so sdgraph reports them as `invalid_input_type` instead.
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Callable, Mapping, Sequence

from engine.context import RunSettings

ANY_TYPE = "*"
log = logging.getLogger("sdgraph.engine")


def _takes_an_argument(function: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it as it is
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in parameters)


class InputError(Exception):
    """A constant that failed conversion or a check; carries a ComfyUI error `type` and a `details` text."""

    def __init__(self, error_type: str, message: str, details: str) -> None:
        super().__init__(details)
        self.error_type = error_type
        self.message = message
        self.details = details


def types_compatible(output_type: str, input_type: str) -> bool:
    """Whether a link from an output of `output_type` may feed an input of `input_type`.

    `*` matches anything; `"A,B"` is a union (ComfyUI writes multi-type sockets that way).
    """
    if ANY_TYPE in (output_type, input_type):
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """What every declared input shares. `extra` passes further `/object_info` options through untouched."""

    optional: bool = False
    tooltip: str | None = None
    lazy: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def type_name(self) -> str:
        raise NotImplementedError

    @property
    def is_widget(self) -> bool:
        """A widget input may be given as a constant; a socket input only as a link."""
        return False

    def has_default(self) -> bool:
        return False

    def accepts_link(self, output_type: str) -> bool:
        return types_compatible(output_type, self.type_name)

    def coerce(self, value: Any) -> Any:
        raise InputError("invalid_input_type", "Input requires a link",
                         f"{self.type_name} input takes a link [node_id, output_index], got constant {value!r}")

    def object_info(self, settings: RunSettings | None = None) -> list:
        return [self.type_name, self._options()]

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.tooltip is not None:
            options["tooltip"] = self.tooltip
        if self.lazy:
            options["lazy"] = True
        options.update(self.extra)
        return options


@dataclass(frozen=True, kw_only=True)
class WidgetSpec(InputSpec):
    """A primitive with an editor widget. `force_input` makes the editor show it as a socket instead."""

    force_input: bool = False

    @property
    def is_widget(self) -> bool:
        return True

    def has_default(self) -> bool:
        return getattr(self, "default", None) is not None

    def _options(self) -> dict[str, Any]:
        options = {}
        if self.has_default():
            options["default"] = getattr(self, "default")
        if self.force_input:
            options["forceInput"] = True
        return {**options, **self._widget_options(), **super()._options()}

    def _widget_options(self) -> dict[str, Any]:
        return {}

    def _invalid(self, value: Any) -> InputError:
        return InputError("invalid_input_type", f"Failed to convert an input value to a {self.type_name} value",
                          f"{value!r} is not a valid {self.type_name}")


def _given(**options: Any) -> dict[str, Any]:
    """The options that were set: `/object_info` leaves unset ones out rather than writing null."""
    return {name: value for name, value in options.items() if value is not None}


def _check_default(spec: Int | Float) -> None:
    """A default outside its own range is a declaration bug; say so when the node is declared."""
    try:
        spec.coerce(spec.default)
    except InputError as problem:
        raise ValueError(f"{spec.type_name} default {spec.default!r} is invalid: {problem.details}") from None


def _check_range(value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise InputError("value_smaller_than_min", "Value smaller than min", f"{value} is smaller than min {minimum}")
    if maximum is not None and value > maximum:
        raise InputError("value_bigger_than_max", "Value bigger than max", f"{value} is bigger than max {maximum}")


@dataclass(frozen=True)
class Int(WidgetSpec):
    default: int
    _: KW_ONLY
    min: int | None = None
    max: int | None = None
    step: int | None = None
    control_after_generate: bool = False

    def __post_init__(self) -> None:
        _check_default(self)

    @property
    def type_name(self) -> str:
        return "INT"

    def coerce(self, value: Any) -> int:
        converted = _to_int(value)
        if converted is None:
            raise self._invalid(value)
        _check_range(converted, self.min, self.max)
        return converted

    def _widget_options(self) -> dict[str, Any]:
        options = _given(min=self.min, max=self.max, step=self.step)
        if self.control_after_generate:
            options["control_after_generate"] = True
        return options


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            value = _to_float(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return result if math.isfinite(result) else None


@dataclass(frozen=True)
class Float(WidgetSpec):
    default: float
    _: KW_ONLY
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | None = None

    def __post_init__(self) -> None:
        _check_default(self)

    @property
    def type_name(self) -> str:
        return "FLOAT"

    def coerce(self, value: Any) -> float:
        converted = _to_float(value)
        if converted is None:
            raise self._invalid(value)
        _check_range(converted, self.min, self.max)
        return converted

    def _widget_options(self) -> dict[str, Any]:
        return _given(min=self.min, max=self.max, step=self.step, round=self.round)


@dataclass(frozen=True)
class String(WidgetSpec):
    default: str = ""
    _: KW_ONLY
    multiline: bool = False
    dynamic_prompts: bool = False

    @property
    def type_name(self) -> str:
        return "STRING"

    def coerce(self, value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise self._invalid(value)

    def _widget_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.multiline:
            options["multiline"] = True
        if self.dynamic_prompts:
            options["dynamicPrompts"] = True
        return options


@dataclass(frozen=True)
class Boolean(WidgetSpec):
    default: bool
    _: KW_ONLY
    label_on: str | None = None
    label_off: str | None = None

    @property
    def type_name(self) -> str:
        return "BOOLEAN"

    def coerce(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise self._invalid(value)

    def _widget_options(self) -> dict[str, Any]:
        return _given(label_on=self.label_on, label_off=self.label_off)


# A fixed list, or a callable evaluated at request time: with no parameters, or with the run's RunSettings
# (a loader lists the files in the configured models folder).
ComboOptions = Sequence[Any] | Callable[[], Sequence[Any]] | Callable[[RunSettings], Sequence[Any]]


@dataclass(frozen=True)
class Combo(WidgetSpec):
    """A choice from a list. `options` may be a callable taking nothing or the RunSettings (e.g. the files
    in the models folder), evaluated each time `/object_info` is produced and each time a prompt is validated."""

    options: ComboOptions
    _: KW_ONLY
    default: Any = None
    control_after_generate: bool = False
    image_upload: bool = False

    @property
    def type_name(self) -> str:
        return "COMBO"

    def current_options(self, settings: RunSettings | None = None) -> list[Any]:
        if not callable(self.options):
            return list(self.options)
        if _takes_an_argument(self.options):
            return list(self.options(settings if settings is not None else RunSettings()))
        return list(self.options())

    def coerce(self, value: Any, options: Sequence[Any] | None = None) -> Any:
        allowed = self.current_options() if options is None else options
        # Python's True == 1 and 1 == 1.0: match the option's kind too, so True never selects option 1.
        if isinstance(value, (str, int, float, bool)) and any(
                value == option and isinstance(value, bool) == isinstance(option, bool)
                and isinstance(value, str) == isinstance(option, str) for option in allowed):
            return value
        raise InputError("value_not_in_list", "Value not in list", f"{value!r} not in {list(allowed)!r}")

    def object_info(self, settings: RunSettings | None = None, *, options: Sequence[Any] | None = None) -> list:
        if options is None:
            try:
                options = self.current_options(settings)
            except Exception:  # an unreadable folder must not take the whole /object_info down
                log.exception("COMBO options could not be listed")
                options = []
        return [list(options), self._options()]

    def _widget_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.control_after_generate:
            options["control_after_generate"] = True
        if self.image_upload:
            options["image_upload"] = True
        return options


@dataclass(frozen=True)
class Socket(InputSpec):
    """An opaque value passed between nodes (MODEL, CLIP, LATENT, IMAGE, ...); only ever a link."""

    type: str

    @property
    def type_name(self) -> str:
        return self.type

    def object_info(self, settings: RunSettings | None = None) -> list:
        options = self._options()
        return [self.type, options] if options else [self.type]


HIDDEN_KINDS = ("UNIQUE_ID", "PROMPT", "EXTRA_PNGINFO")


@dataclass(frozen=True)
class Hidden:
    """A value the engine fills: UNIQUE_ID (the node's id), PROMPT (the whole API prompt) or EXTRA_PNGINFO
    (the client's `extra_data.extra_pnginfo`, normally `{"workflow": ...}`)."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in HIDDEN_KINDS:
            raise ValueError(f"Hidden input kind {self.kind!r} is not one of {HIDDEN_KINDS}")
