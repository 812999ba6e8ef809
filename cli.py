"""
The command line of every script: --key=value options read into dataclasses, and UserError.

A script declares its options as a dataclass, one field per option, typed, with its help text as
the field's trailing comment:

    @dataclass
    class SampleConfig:
        out_dir: str = "out-gpt"
        top_k: int = 200                       # 1 = greedy; 0 = all tokens
        dtype: Literal["auto", "float32"] = "auto"

and parse_options(argv, SampleConfig()) returns a filled copy: "--top_k=50" becomes the int 50,
a bool takes True/False (or 1/0), a Literal is a choice, --help prints every option with its
default and comment. This file imports nothing heavy (no torch), so prepare_data.py, which
needs only numpy, can use it too.
"""
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from typing import Literal


class UserError(Exception):
    """A problem the user can act on; the scripts print it as one line, "<script>: error: ..."."""


BOOLS = {"true": True, "1": True, "false": False, "0": False}


def parse_value(key, text, kind):
    """The command-line text of option --key as `kind`: bool, int, float, str or Literal[choices].
    `kind` may also be a default value, whose type is used."""
    if not (isinstance(kind, type) or typing.get_origin(kind) is Literal):
        kind = type(kind)
    if typing.get_origin(kind) is Literal:
        for choice in typing.get_args(kind):  # a bool choice takes the spellings of a bool option
            if text == str(choice) or (isinstance(choice, bool) and BOOLS.get(text.lower()) is choice):
                return choice
        raise UserError(f"--{key}={text}: choose one of {', '.join(map(str, typing.get_args(kind)))}")
    try:
        if kind is bool:
            return BOOLS[text.lower()]
        if kind is int:  # 5e9 is a fine way to write 5,000,000,000 tokens
            return int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text)
        if kind is float:
            return float(text)
        return text
    except (KeyError, ValueError):
        example = {bool: "True or False (or 1 or 0)", int: "a whole number such as 20 or 5e9",
                   float: "a number such as 0.1 or 1e-3"}[kind]
        raise UserError(f"--{key}={text}: expected {kind.__name__}, {example}") from None


def option_pairs(argv):
    """{key: text} of --key=value arguments, in order; -h or --help gives the key "help"."""
    pairs = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            pairs["help"] = ""
            continue
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or not eq or not key:
            raise UserError(f"bad argument {arg!r}; options are written --key=value (--help lists them)")
        pairs[key] = value
    return pairs


def field_comments(cls):
    """({field: help}, {field: heading}) from the source of dataclass `cls`: a field's help is its
    trailing comment, continued by comments aligned under it on the lines below; a comment on a
    line of its own elsewhere heads the fields that follow it (TrainConfig's "# system")."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source file (e.g. an interactive session): no help texts
        return {}, {}
    body = ast.parse(source).body[0].body
    fields_at = {n.lineno: n.target.id for n in body if isinstance(n, ast.AnnAssign)}
    comments_at = {t.start[0]: t for t in tokenize.generate_tokens(io.StringIO(source).readline)
                   if t.type == tokenize.COMMENT}
    helps, headings, heading, field, column = {}, {}, None, None, None
    for line in sorted({*fields_at, *comments_at}):
        comment = comments_at.get(line)
        text = comment.string.lstrip("#").strip() if comment else ""
        if line in fields_at:
            field, column = fields_at[line], comment.start[1] if comment else None
            helps[field] = text
            if heading:
                headings[field], heading = heading, None
        elif field in helps and comment.start[1] == column:
            helps[field] += " " + text
        else:
            heading, column = text, None
    return helps, headings


def options_help(config, title):
    """The --help lines of a dataclass instance: every option with its default and help text."""
    helps, headings = field_comments(type(config))
    types = typing.get_type_hints(type(config))
    lines = [f"{title}:"]
    for f in dataclasses.fields(config):
        if f.name in headings:
            lines.append(f"  # {headings[f.name]}")
        value = getattr(config, f.name)
        quote = isinstance(value, str) and (not value or not value.isprintable() or " " in value)
        default = repr(value) if quote else str(value)  # as a shell takes them: --preset='', --start='\n'
        text = helps.get(f.name, "")
        if typing.get_origin(types[f.name]) is Literal:
            choices = f"one of {', '.join(map(str, typing.get_args(types[f.name])))}"
            text = f"{choices}; {text}" if text else choices
        lines.append(f"  --{f.name}={default:<{max(1, 30 - len(f.name))}} {text}".rstrip())
    return "\n".join(lines)


def parse_options(argv, *configs, doc="", titles=(), rest=False):
    """Fill copies of the dataclass instances `configs` from --key=value arguments, typed from the
    fields' types (a key goes to the first config that has it). Returns a list: the filled copies,
    then, with rest=True, the arguments no config has (for the caller to check), which otherwise
    are an error listing the options. --help prints doc and every option (headed by `titles`, one
    per config), then exits."""
    pairs = option_pairs(argv)
    if "help" in pairs:
        titles = titles or ["options"] * len(configs)
        print("\n\n".join([doc.strip(), *(options_help(c, t) for c, t in zip(configs, titles))]))
        sys.exit(0)
    filled = [dataclasses.replace(c) for c in configs]
    types = [typing.get_type_hints(type(c)) for c in configs]
    unknown = []
    for key, text in pairs.items():
        owner = next((i for i, t in enumerate(types) if key in t), None)
        if owner is None:
            unknown.append(f"--{key}={text}")
        else:
            setattr(filled[owner], key, parse_value(key, text, types[owner][key]))
    if unknown and not rest:
        names = [f"--{f.name}" for c in configs for f in dataclasses.fields(c)]
        raise UserError(f"unknown option {unknown[0]}; the options are {', '.join(names)}")
    return filled + [unknown] if rest else filled
