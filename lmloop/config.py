"""Typed, frozen stage configs: YAML file + `key=value` / `--key value` overrides.

Every stage declares one frozen dataclass. Each field is documented once, where it is declared,
through `param(default, "help")`; that text is what `lmloop <stage> --help` prints.

    lmloop train configs/train/tiny-cpu.yaml optim.lr=3e-4 --max-steps 20

Values are coerced by the declared type (so `3e-4` is a float even where PyYAML reads a string,
and `no` is only a bool where a bool is declared). Unknown keys get a did-you-mean; every error
is collected and reported at once as one `UserError`. This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from lmloop.errors import UserError, did_you_mean

_TRUE = {"true", "yes", "on", "1", "y"}
_FALSE = {"false", "no", "off", "0", "n"}
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def param(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002
    *,
    inline: bool = False,
    **kw: Any,
) -> Any:
    """A documented config field. Lists and dicts get a fresh copy per instance. An `inline`
    nested spec's fields are set without its name (`--temperature`, not `--sampling.temperature`)."""
    meta = {"help": help, "inline": inline}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata=meta, **kw
        )
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=lambda: default, metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _aliases(cls: type) -> dict[str, tuple[str, Any]]:
    """A config's flag aliases: `__aliases__ = {"int4": ("precision", "int4")}` makes `--int4`
    (or `int4: true` in YAML) set `precision` to "int4"; `int4: false` sets nothing."""
    return dict(getattr(cls, "__aliases__", {}) or {})


def _apply_aliases(cls: type, values: dict[str, Any], prefix: str, errors: list[str]) -> None:
    """Replace alias keys in `values` by the field they stand for (in place)."""
    for alias, (name, target) in _aliases(cls).items():
        keys = [k for k in list(values) if k.replace("-", "_") == alias]
        for key in keys:
            raw = values.pop(key)
            try:
                on = coerce(raw, bool, prefix + alias)
            except ValueError as e:
                errors.append(str(e))
                continue
            if not on:
                continue
            given = next((k for k in values if k.replace("-", "_") == name), None)
            if given is not None and str(values[given]).lower() != str(target).lower():
                flag, field = f"--{prefix}{alias}", f"--{prefix}{name}".replace("_", "-")
                errors.append(
                    f"{flag} means {field} {target}, but {field} is {values[given]}: give one"
                )
                continue
            values[given or name] = target


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return functools.reduce(operator.or_, args), True
    return tp, False


def type_name(tp: Any) -> str:
    tp, optional = _unwrap_optional(tp)
    origin = get_origin(tp)
    if origin is Literal:
        name = "|".join(str(a) for a in get_args(tp))
    elif origin in (list, tuple):
        name = f"list[{type_name(get_args(tp)[0])}]"
    elif origin is dict:
        name = "map"
    elif dataclasses.is_dataclass(tp):
        name = tp.__name__
    else:
        name = getattr(tp, "__name__", str(tp))
    return f"{name}?" if optional else name


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (a CLI string or a YAML scalar) to `tp`; raise ValueError with a reason."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (
        optional and isinstance(value, str) and value.lower() in {"none", "null", "~", ""}
    ):
        if optional:
            return None
        raise ValueError(f"{key}: got null, expected {type_name(tp)}")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or str(value).lower() == str(c).lower():
                return c
        raise ValueError(
            f"{key}: got '{value}', expected one of {', '.join(map(str, choices))}"
            + did_you_mean(str(value), [str(c) for c in choices])
        )
    if origin in (list, tuple):
        (inner,) = get_args(tp)[:1]
        items = value if isinstance(value, (list, tuple)) else [value]
        out = [coerce(v, inner, key) for v in items]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: got '{value}', expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return build(tp, value, prefix=f"{key}.")
        if isinstance(value, str) and hasattr(tp, "from_string"):
            return tp.from_string(value)
        raise ValueError(f"{key}: got '{value}', expected a mapping of {tp.__name__} fields")
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in _TRUE | _FALSE:
            return s in _TRUE
        raise ValueError(f"{key}: got '{value}', expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: got '{value}', expected an integer")
        if isinstance(value, int):
            return value
        try:
            f = float(str(value).replace("_", ""))
        except ValueError:
            raise ValueError(f"{key}: got '{value}', expected an integer") from None
        if not f.is_integer():
            raise ValueError(f"{key}: got '{value}', expected an integer")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: got '{value}', expected a number")
        try:
            return float(str(value).replace("_", "")) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: got '{value}', expected a number (e.g. 3e-4)") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key}: got a {type(value).__name__}, expected a string")
        return str(value)
    if tp is Path:
        return Path(str(value))
    if tp is Any:
        return value
    raise ValueError(f"{key}: unsupported field type {tp}")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _inline(cls: type) -> dict[str, type]:
    """Field name -> type of each inline nested spec of `cls`."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("inline")}


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts (nested dataclasses expanded)."""
    keys = []
    hints = get_type_hints(cls)
    for name in _field_names(cls):
        tp, _ = _unwrap_optional(hints[name])
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, prefix + ("" if name in _inline(cls) else name + "."))
        else:
            keys.append(prefix + name)
    return keys + [prefix + alias for alias in _aliases(cls)]


def build(
    cls: type,
    values: dict[str, Any],
    prefix: str = "",
    errors: list[str] | None = None,
    defaults: Any = None,
):
    """Build `cls` from a nested dict, collecting every error; raise once at the top level.

    `defaults`: an instance of `cls` whose fields are the defaults of a nested spec given in part
    (a field's own default spec, e.g. the loop's `train` with LoRA on, not `TrainConfig()`), so
    `train.lora.alpha=8` keeps the loop's `train.lora.r`, at every depth."""
    top = errors is None
    errors = [] if errors is None else errors
    hints = get_type_hints(cls)
    names = _field_names(cls)
    values = dict(values)
    for name, tp in _inline(cls).items():  # its flat keys move under its own name
        own = set(get_type_hints(tp)) | set(_aliases(tp))
        moved = {k: values.pop(k) for k in list(values) if k.replace("-", "_") in own}
        if moved:
            values[name] = {**(values.get(name) or {}), **moved}
    _apply_aliases(cls, values, prefix, errors)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in names:
            errors.append(
                f"unknown key '{prefix}{key}'"
                + did_you_mean(prefix + name, all_keys(cls, prefix) + [prefix + n for n in names])
            )
            continue
        tp, _ = _unwrap_optional(hints[name])
        try:
            if dataclasses.is_dataclass(tp) and isinstance(value, dict):
                value = dict(value)  # its aliases first: the defaults below are not "given"
                shown = prefix if name in _inline(cls) else prefix + name + "."
                _apply_aliases(tp, value, shown, errors)
                # a spec given in part keeps its field's defaults (the enclosing default's, when
                # that spec was itself given in part)
                base = getattr(defaults, name) if defaults is not None else _default(cls, name)
                if isinstance(base, tp):
                    value = {f.name: getattr(base, f.name) for f in dataclasses.fields(tp)} | value
                kw = {"defaults": base} if isinstance(base, tp) else {}
                kwargs[name] = build(tp, value, prefix + name + ".", errors, **kw)
            else:
                kwargs[name] = coerce(value, hints[name], prefix + name)
        except ValueError as e:
            errors.append(str(e))
        except UserError as e:
            errors.append(e.line())
    missing = [
        prefix + f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    errors += [f"missing required key '{m}'" for m in missing]
    obj = None
    if not errors or not top:
        try:
            obj = cls(**kwargs) if not missing else None
        except (ValueError, TypeError) as e:
            errors.append(f"{prefix.rstrip('.') or cls.__name__}: {e}")
        except UserError as e:
            errors.append(e.line())
    if top and errors:
        raise UserError("invalid config: " + "; ".join(dict.fromkeys(errors)))
    return obj


class _Loader(yaml.SafeLoader):
    """YAML 1.2-ish booleans: only true/false are bools (so `no` stays a string until coerced)."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}", hint="pass an existing .yaml file")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _set_dotted(tree: dict[str, Any], key: str, value: Any, append: bool) -> None:
    *path, last = key.split(".")
    node = tree
    for part in path:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if append and isinstance(node.get(last), list):
        node[last].append(value)
    else:
        node[last] = value


def _field_type(cls: type, dotted: str) -> Any | None:
    tp: Any = cls
    for part in dotted.split("."):
        tp, _ = _unwrap_optional(tp)
        if not dataclasses.is_dataclass(tp):
            return None
        hints = {**get_type_hints(tp), **{a: bool for a in _aliases(tp)}}
        for inner in _inline(tp).values():
            if part not in hints and part in {**get_type_hints(inner), **_aliases(inner)}:
                hints = {**get_type_hints(inner), **{a: bool for a in _aliases(inner)}}
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _is_list(tp: Any) -> bool:
    tp, _ = _unwrap_optional(tp)
    return get_origin(tp) in (list, tuple)


def _is_bool(tp: Any) -> bool:
    tp, _ = _unwrap_optional(tp)
    return tp is bool


def parse_args(cls: type, argv: list[str]) -> Any:
    """`[CONFIG.yaml] [key=value ...] [--key value ...] [positional ...]` -> a `cls` instance."""
    tree: dict[str, Any] = {}
    errors: list[str] = []
    args = list(argv)
    if args and not args[0].startswith("-") and args[0].endswith((".yaml", ".yml")):
        tree = load_yaml(args.pop(0))
    positional_fields = list(getattr(cls, "__positional__", ()))
    cli_lists: set[str] = set()  # list keys first set on the command line (replace, then append)
    positional_values: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if tok.startswith("--") and len(tok) > 2:
            body = tok[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            else:
                key = body
                tp = _field_type(cls, key.replace("-", "_"))
                if tp is not None and _is_bool(tp):
                    if i < len(args) and args[i].lower() in _TRUE | _FALSE:
                        value = args[i]
                        i += 1
                    else:
                        value = "true"
                elif key.startswith("no-") and _is_bool(
                    _field_type(cls, key[3:].replace("-", "_")) or int
                ):
                    key, value = key[3:], "false"
                elif i < len(args):
                    value = args[i]
                    i += 1
                else:
                    errors.append(f"option --{key} needs a value")
                    continue
        elif "=" in tok and _KEY.match(tok.split("=", 1)[0]):
            key, value = tok.split("=", 1)
        else:
            positional_values.append(tok)
            continue
        key = key.replace("-", "_")
        tp = _field_type(cls, key)
        if tp is not None and _is_list(tp):
            _set_dotted(
                tree, key, [value] if key not in cli_lists else value, append=key in cli_lists
            )
            cli_lists.add(key)
        else:
            _set_dotted(tree, key, value, append=False)
    if positional_values:
        if not positional_fields:
            errors.append(
                f"unexpected argument '{positional_values[0]}' (options are key=value or --key value)"
            )
        else:
            for j, name in enumerate(positional_fields):
                if j >= len(positional_values):
                    break
                tp = _field_type(cls, name)
                if tp is not None and _is_list(tp):
                    tree[name] = positional_values[j:]
                    positional_values = positional_values[: j + 1]
                    break
                tree[name] = positional_values[j]
            if len(positional_values) > len(positional_fields):
                errors.append(f"unexpected argument '{positional_values[len(positional_fields)]}'")
    if errors:
        try:
            build(cls, tree)
        except UserError as e:
            errors.append(e.message.removeprefix("invalid config: "))
        raise UserError("invalid arguments: " + "; ".join(errors))
    return build(cls, tree)


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def format_help(cls: type, command: str, summary: str) -> str:
    """The `--help` text: each field with its type, default and the help declared beside it."""
    lines = [f"usage: lmloop {command} [CONFIG.yaml] [key=value ...] [--key value ...]", ""]
    if summary:
        lines += [summary, ""]
    pos = getattr(cls, "__positional__", ())
    if pos:
        lines.insert(1, f"       positional: {' '.join(p.upper() for p in pos)}")
    lines.append("options:")

    def walk(c: type, prefix: str, base: Any = None) -> None:
        hints = get_type_hints(c)
        for f in dataclasses.fields(c):
            if not f.init:
                continue
            tp, _ = _unwrap_optional(hints[f.name])
            default = _default(c, f.name) if base is None else getattr(base, f.name)
            if dataclasses.is_dataclass(tp):
                inner = default if isinstance(default, tp) else None
                walk(tp, prefix + ("" if f.metadata.get("inline") else f.name + "."), inner)
                continue
            default = "(required)" if default is dataclasses.MISSING else default
            flag = "--" + (prefix + f.name).replace("_", "-")
            lines.append(f"  {flag} {type_name(hints[f.name])}  [default: {default}]")
            helptext = f.metadata.get("help", "")
            if helptext:
                lines.append(f"      {helptext}")
        for alias, (name, target) in _aliases(c).items():
            flag = "--" + (prefix + alias).replace("_", "-")
            lines.append(f"  {flag}  alias of --{(prefix + name).replace('_', '-')} {target}")

    walk(cls, "")
    lines += [
        "",
        "common flags: --print-config (print the resolved YAML and exit), --debug (tracebacks)",
    ]
    return "\n".join(lines)
