"""Reading the config tree: YAML files and flags -> a checked `Config`, the same for every command.

    cfg = parse_command(EVAL, ["--config", "run.yaml", "--adapter", "runs/x/adapter", "--eval.k", "4"])

Every field is a flag, `--section.field VALUE` (or `=VALUE`, nested sections as `--sae.train.k`). A
command also takes its own section's fields by their short names (`rank1 eval --k 4` is `--eval.k 4`;
booleans as `--merge` / `--no-merge`), a few global short flags (`SHORT_FLAGS`) and its positional
arguments. Values are parsed as YAML scalars (strings stay as typed) and checked against the field's
type, then `check_tree` checks every choice and range before any work starts.
"""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rank1.core.config import KEY_ALIASES, Config, ConfigError, cross_checks

SHORT_FLAGS = {
    "--objective": "trainer.objective",
    "--model": "model.name_or_path",
    "--data": "data.path",
    "--max-steps": "trainer.max_steps",
    "--output-dir": "logging.output_dir",
    "--seed": "seed",
    "--lr": "trainer.lr",
}
SWITCHES = {"--resume": ("trainer.resume", True)}  # global flags that take no value


@dataclass(frozen=True)
class Command:
    """How one `rank1 COMMAND` reads its arguments into the tree."""

    name: str
    summary: str
    section: str | None = None  # dotted section whose fields are also flags by their short names
    positionals: tuple[str, ...] = ()  # dotted keys filled, in order, by bare arguments
    flags: dict[str, str] = field(default_factory=dict)  # extra short flags -> dotted keys
    switches: dict[str, tuple[str, Any]] = field(default_factory=dict)  # extra flags without a value
    required: tuple[str, ...] = ()  # dotted keys that must end up set
    config_positional: str | None = None  # a positional that is also read as --config (plan's recipe)


# ---------------------------------------------------------------- typed assignment


def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional_inner(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) != len(typing.get_args(tp))
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    inner, optional = _optional_inner(tp)
    if optional:
        return None if value is None else coerce(value, inner, key)
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # zero_stage: 3 in YAML is the choice '3'
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # --adapter.target_modules q_proj,v_proj
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        named = (lambda i: key) if typing.get_origin(item) is Literal else (lambda i: f"{key}[{i}]")
        return [coerce(v, item, named(i)) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads '2e-3' as a string
            value = float(value) if tp is float else int(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def resolve_key(cfg: Config, dotted: str) -> tuple[Any, str, Any]:
    """'trainer.lr' -> (cfg.trainer, 'lr', float); errors list the valid keys."""
    dotted = KEY_ALIASES.get(dotted, dotted)
    obj, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts):
        types_ = field_types(type(obj))
        if part not in types_:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"unknown config key '{dotted}' ({where} has: {', '.join(types_)})")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(types_[part]):
                first = dataclasses.fields(types_[part])[0].name
                raise ConfigError(f"'{dotted}' is a section; set one of its fields, e.g. --{dotted}.{first}")
            return obj, part, types_[part]
        obj = getattr(obj, part)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"unknown config key '{dotted}': '{'.'.join(parts[: i + 1])}' is not a section")
    raise AssertionError


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    obj, name, tp = resolve_key(cfg, dotted)
    setattr(obj, name, coerce(value, tp, KEY_ALIASES.get(dotted, dotted)))


def get_value(cfg: Config, dotted: str) -> Any:
    obj, name, _ = resolve_key(cfg, dotted)
    return getattr(obj, name)


def section(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def apply_mapping(cfg: Config, mapping: dict, prefix: str = "", source: str = "") -> None:
    for key, value in mapping.items():
        dotted = KEY_ALIASES.get(f"{prefix}{key}", f"{prefix}{key}")
        if isinstance(value, dict):
            obj = cfg
            for part in dotted.split("."):
                if not dataclasses.is_dataclass(obj) or part not in field_types(type(obj)):
                    raise ConfigError(f"{source}: unknown config section '{dotted}'")
                obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{source}: '{dotted}' is a field, not a section")
            apply_mapping(cfg, value, dotted + ".", source)
        else:
            try:
                set_value(cfg, dotted, value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}" if source else str(e)) from None


# ---------------------------------------------------------------- checking


def check_tree(obj, prefix: str = "") -> None:
    """Check every field of a section (and its subsections) against its type and range."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_tree(value, key + ".")
            continue
        coerce(value, field_types(type(obj))[f.name], key)  # choices (Literal) and types
        for bound, limit in f.metadata.get("limits", {}).items():
            if value is None:
                continue
            ok = {"gt": value > limit, "ge": value >= limit, "lt": value < limit, "le": value <= limit}[bound]
            if not ok:
                sign = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}[bound]
                raise ConfigError(f"{key}: must be {sign} {limit:g}, got {value}")


def validate(cfg: Config) -> None:
    check_tree(cfg)
    cross_checks(cfg)


# ---------------------------------------------------------------- argv


def _read_yaml(cfg: Config, config_file: str) -> None:
    path = Path(config_file)
    try:
        mapping = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"--config {config_file}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {config_file}: not valid YAML ({e})") from None
    if mapping is not None and not isinstance(mapping, dict):
        raise ConfigError(f"--config {config_file}: expected a mapping of sections at the top")
    apply_mapping(cfg, mapping or {}, source=str(config_file))


def flag_tables(command: Command | None) -> tuple[dict[str, str], dict[str, tuple[str, Any]]]:
    flags, switches = dict(SHORT_FLAGS), dict(SWITCHES)
    if command is not None:
        if command.section:
            own = section(Config(), command.section)
            for name, tp in field_types(type(own)).items():
                flag, key = "--" + name.replace("_", "-"), f"{command.section}.{name}"
                if tp is bool:
                    switches[flag], switches["--no-" + flag[2:]] = (key, True), (key, False)
                else:
                    flags[flag] = key
        flags.update(command.flags)
        switches.update(command.switches)
    return flags, switches


def _parse_raw(raw: str, tp: Any) -> Any:
    """A flag's text as a value: YAML scalars, except that text fields keep exactly what was typed."""
    inner, optional = _optional_inner(tp)
    if optional and raw.lower() in ("null", "none", "~"):
        return None
    if inner is str:
        return raw
    if typing.get_origin(inner) is list and typing.get_args(inner)[0] is str and not raw.lstrip().startswith("["):
        return raw  # a, b, c (split later); [a, b] is read as YAML like any other list
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw
    return value if isinstance(value, (str, int, float, bool, list, type(None))) else raw


def parse_command(command: Command | None, argv: list[str], *, check: bool = True) -> Config:
    """argv of one command -> the resolved, checked config tree. --config files apply first, then flags in order."""
    flags, switches = flag_tables(command)
    cfg, assignments, positionals, config_files, i = Config(), [], [], [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            positionals.append(arg)
            i += 1
            continue
        name, eq, inline = arg.partition("=")
        if name in switches:
            key, value = switches[name]
            assignments.append((key, yaml.safe_load(inline) if eq else value, name, False))
            i += 1
            continue
        if eq:
            raw, i = inline, i + 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"flag {name} needs a value")
            raw, i = argv[i + 1], i + 2
        if name == "--config":
            config_files.append(raw)
            continue
        assignments.append((flags.get(name, name[2:]), raw, name, True))
    slots = command.positionals if command else ()
    if len(positionals) > len(slots):
        extra = positionals[len(slots)]
        what = f"{command.name} takes {len(slots)} positional argument(s)" if command else "flags look like --trainer.lr 1e-3"
        raise ConfigError(f"unexpected argument '{extra}' ({what})")
    if command and command.config_positional and command.config_positional in slots[: len(positionals)]:
        config_files.insert(0, positionals[slots.index(command.config_positional)])
    for config_file in config_files:
        if command and command.config_positional and not Path(config_file).is_file():
            raise ConfigError(f"recipe {config_file}: no such file")
        _read_yaml(cfg, config_file)
    for key, text in zip(slots, positionals):
        set_value(cfg, key, text)
    for key, value, flag, is_text in assignments:
        try:
            _, _, tp = resolve_key(cfg, key)
            set_value(cfg, key, _parse_raw(value, tp) if is_text else value)
        except ConfigError as e:
            raise ConfigError(f"flag {flag}: {e}") from None
    if cfg.logging.output_dir is None and command is not None and command.name in ("train", "sweep"):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.logging.output_dir = f"runs/{'sweep' if command.name == 'sweep' else cfg.trainer.objective}-{stamp}"
    if check:
        try:
            validate(cfg)
        except ConfigError as e:  # name the flag as typed, when one set the field at fault
            typed = next((flag for key, _, flag, _ in reversed(assignments) if str(e).startswith(KEY_ALIASES.get(key, key) + ":")), None)
            raise ConfigError(f"flag {typed}: {e}" if typed else str(e)) from None
        for key in command.required if command else ():
            if get_value(cfg, key) is None:
                flag = next((f for f, k in {**flags, **dict(zip(slots, slots))}.items() if k == key), f"--{key}")
                shown = key.rsplit(".", 1)[-1].upper() if key in slots else f"{flag} ({key})"
                raise ConfigError(f"rank1 {command.name}: {shown} is required")
    return cfg


def usage(command: Command) -> str:
    """`rank1 COMMAND --help`: the positionals, the command's own flags with defaults, and the rule for the rest."""
    lines = [f"rank1 {command.name} {' '.join(k.rsplit('.', 1)[-1].upper() for k in command.positionals)} [flags]".rstrip(),
             "", command.summary, ""]
    flags, switches = flag_tables(command)
    defaults = Config()
    shown = {k: v for k, v in flags.items() if k not in SHORT_FLAGS or v.startswith(command.section or "\0")}
    shown.update({k: v for k, v in command.flags.items()})
    for flag, key in sorted(shown.items()):
        lines.append(f"  {flag:<26} {key} (default {get_value(defaults, key)!r})")
    for flag, (key, value) in sorted(switches.items()):
        if flag != "--resume" and not flag.startswith("--no-"):
            lines.append(f"  {flag:<26} {key} = {value!r}")
    lines += ["", "  --config FILE              a YAML config tree (e.g. a run's config.yaml), applied first",
              "  --section.field VALUE      any other field of the tree; `rank1 config show` lists them"]
    return "\n".join(lines)


# ---------------------------------------------------------------- round trip


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(mapping: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a run's saved config.yaml); old spellings are read too."""
    cfg = Config()
    apply_mapping(cfg, _upgrade(mapping), source="saved config")
    return cfg


def _upgrade(mapping: dict) -> dict:
    """Config files of earlier versions: the SAE section held the training fields at its top."""
    sae = mapping.get("sae")
    if isinstance(sae, dict) and "k" in sae:
        mapping = {**mapping, "sae": {"train": {k: v for k, v in sae.items() if not isinstance(v, dict)},
                                      **{k: v for k, v in sae.items() if isinstance(v, dict)}}}
    rollout = mapping.get("rollout")
    if isinstance(rollout, dict) and {"max_new_tokens", "temperature", "top_p"} & rollout.keys():
        rollout = dict(rollout)
        moved = {"max_new_tokens": ("eval", "max_new_tokens"), "temperature": ("grpo", "temperature"), "top_p": ("grpo", "top_p")}
        mapping = dict(mapping)
        for old, (sec, new) in moved.items():
            if old in rollout:
                mapping[sec] = {**mapping.get(sec, {}), new: rollout.pop(old)}
        mapping["rollout"] = rollout
    return mapping


def load_config(argv: list[str] | None = None, *, validate_now: bool = True) -> Config:
    """The `rank1 train` reading of argv (also used by tests and benchmarks)."""
    from rank1.core.commands import TRAIN

    return parse_command(TRAIN, list(argv or []), check=validate_now)
