"""Flags made from the config dataclasses (each field a flag, its comment the help), the errors a
user can fix, and the helpers the configs' checks use to name a flag.

Public: UsageError, ConfigError, CheckpointError, Parser, parse_configs, flag, require.
"""
import argparse
import inspect
import io
import re
import textwrap
import tokenize
from dataclasses import fields


# --------------------------------------------------------------------------------------------------
# Errors the user can fix
# --------------------------------------------------------------------------------------------------
class UsageError(Exception):
    """Bad input from the user. The scripts print it as one line and exit with status 2."""


class ConfigError(UsageError):
    """A flag, or a combination of flags, that cannot work."""


class CheckpointError(UsageError):
    """A checkpoint that is missing, unreadable, not free-min's or not the one a flag needs."""


class DataError(UsageError):
    """Bad input data, or a flag that asks for data that cannot be made."""


# --------------------------------------------------------------------------------------------------
# Flags from the config dataclasses
# --------------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2, without the (long) usage text. A
    module docstring given as the description is shown without its 'Public:' list, which is for a
    reader of the code."""

    def __init__(self, *args, description: str | None = None, **kwargs):
        if description:
            description = description.split("\nPublic:")[0]
        super().__init__(*args, description=description, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} -h)\n")


def add_config_args(parser, cfg_class, defaults: dict | None = None) -> None:
    """Add --field-name for each field of a config dataclass, typed, with the field's comment as
    its help (field_help) and its default. Fields with metadata flag=False are derived from the
    data and have no flag."""
    defaults, helps = defaults or {}, field_help(cfg_class)
    group = parser.add_argument_group(cfg_class.__name__)
    for f in fields(cfg_class):
        if not f.metadata.get("flag", True):
            continue
        default = defaults.get(f.name, f.default)
        help_text = f"{helps.get(f.name, '')} (default: {default!r})"
        kwargs = {"default": default, "help": help_text, "dest": f.name}
        if f.type in (bool, "bool"):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        group.add_argument(flag(f.name), **kwargs)


def field_help(cfg_class) -> dict[str, str]:
    """Each field's help text: the comment beside the field, or else the comment lines right above
    it, read from the dataclass's source (every config field is commented, as in nanoGPT)."""
    src = textwrap.dedent(inspect.getsource(cfg_class))
    comments = {tok.start[0]: tok.string[1:].strip()
                for tok in tokenize.generate_tokens(io.StringIO(src).readline)
                if tok.type == tokenize.COMMENT}
    names, helps, above = {f.name for f in fields(cfg_class)}, {}, []
    for n, line in enumerate(src.splitlines(), 1):
        if line.strip().startswith("#"):
            above.append(comments[n])
            continue
        name = re.match(r"\s*(\w+)\s*:", line)
        if name and name.group(1) in names:
            helps[name.group(1)] = comments.get(n) or " ".join(above)
        above = []
    return helps


def config_from_args(cfg_class, args):
    """Build a config dataclass from parsed arguments (fields without a flag keep their default)."""
    values = {f.name: getattr(args, f.name) for f in fields(cfg_class) if hasattr(args, f.name)}
    return cfg_class(**values)


def parse_configs(argv, description: str, classes: tuple, presets: dict, uses: dict):
    """Flags for every field of the config dataclasses `classes`, with --preset NAME choosing their
    defaults (presets: name -> the fields it changes; uses: name -> what it is for). Returns (args,
    one config per class)."""
    pre = Parser(add_help=False)
    pre.add_argument("--preset", default="default", choices=list(presets))
    preset = pre.parse_known_args(argv)[0].preset
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    changes = [f"{name} ({uses[name]}) changes "
               + ", ".join(f"{flag(k)} {v}" for k, v in kw.items())
               for name, kw in presets.items() if kw]
    p.add_argument("--preset", default="default", choices=list(presets),
                   help=f"named defaults: default ({uses['default']}); " + "; ".join(changes)
                   + ". The defaults shown below are those of the preset given")
    for cls in classes:
        add_config_args(p, cls, presets[preset])
    args = p.parse_args(argv)
    return args, *(config_from_args(cls, args) for cls in classes)


def flag(name: str) -> str:
    """The flag of a config field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def require(cfg, names, low: float, strict: bool) -> None:
    """ConfigError unless every field `names` of cfg is > low (strict) or >= low."""
    for name in names:
        value = getattr(cfg, name)
        if value < low or (strict and value == low):
            sign = ">" if strict else ">="
            raise ConfigError(f"{flag(name)} must be {sign} {low:g} (got {value})")
