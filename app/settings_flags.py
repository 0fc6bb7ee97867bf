"""Command-line flags for every setting of a config model: `--batch-size 8`, `--no-packing`,
`--train.iters 5` for a nested section. Built from the model, so flags, YAML and the Prefect form agree."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from streamtune.config import ConfigError, _closest, _section, dotted_fields, flag_type

# Values of these shapes are written as YAML on the command line: --lora-keys '[self_attn.q_proj]'
_YAML_TYPES = (list, dict, tuple)


def _field(cls: type[BaseModel], dotted: str):
    info = None
    for part in dotted.split("."):
        info = cls.model_fields.get(part)
        if info is None:
            return None
        cls = _section(info.annotation) or cls
    return None if _section(info.annotation) else info


def _parse_value(info, raw: str) -> Any:
    import yaml

    inner, optional = flag_type(info.annotation)
    if optional and raw.lower() in ("null", "none"):
        return None
    origin = getattr(inner, "__origin__", inner)
    if origin in _YAML_TYPES or (isinstance(origin, type) and issubclass(origin, dict | list)):
        return yaml.safe_load(raw)
    return raw


def parse_flags(cls: type[BaseModel], tokens: list[str]) -> dict[str, Any]:
    """{dotted name: value} from `--name value`, `--name=value`, `--flag`, `--no-flag` tokens."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}")
        name, _, value = token[2:].partition("=")
        dotted = name.replace("-", "_")
        info = _field(cls, dotted)
        negated = info is None and dotted.rsplit(".", 1)[-1].startswith("no_")
        if negated:
            head, _, leaf = dotted.rpartition(".")
            dotted = f"{head}.{leaf[3:]}" if head else leaf[3:]
            info = _field(cls, dotted)
        if info is None:
            hint = _closest(dotted.rsplit(".", 1)[-1], cls)
            flag = "--" + hint.replace("_", "-") if hint else None
            raise ConfigError(f"unknown option --{name}" + (f"; did you mean {flag}?" if flag else ""))
        is_bool = flag_type(info.annotation)[0] is bool
        if is_bool and not value and (i + 1 == len(tokens) or tokens[i + 1].startswith("--")):
            out[dotted] = not negated
            i += 1
            continue
        if negated:
            raise ConfigError(f"--{name} takes no value")
        if not value:
            if i + 1 == len(tokens):
                raise ConfigError(f"--{name} needs a value")
            value, i = tokens[i + 1], i + 1
        out[dotted] = _parse_value(info, value)
        i += 1
    return out


def flags_help(cls: type[BaseModel], skip: tuple[str, ...] = ()) -> str:
    """One line per setting for a command's help text."""
    lines = []
    for dotted in dotted_fields(cls):
        info = _field(cls, dotted)
        if dotted in skip or info.exclude or dotted.endswith(("storage_options", "template")):
            continue
        default = info.get_default(call_default_factory=True)
        if isinstance(default, list) and len(default) > 4:
            default = f"[{len(default)} items]"
        kind = flag_type(info.annotation)[0]
        flag = "--" + dotted.replace("_", "-")
        if kind is bool:
            head, _, leaf = dotted.rpartition(".")
            flag += "/--" + (f"{head}." if head else "") + "no-" + leaf.replace("_", "-")
        lines.append(f"{flag}  {info.description or ''} [default: {default}]")
    return "\n\n".join(lines)
