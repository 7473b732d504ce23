"""Reading the project's text inputs (configs, lists, annotation files, JSON) with a one-line error."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from src.errors import clipped_repr


def read_utf8(path: Path, error: type[Exception]) -> str:
    """The text of `path`, without the byte-order mark some Windows editors write first (it would be
    part of the first line: a list's first path, "file not found"); raises `error` naming the file and
    the first bad byte when it is not UTF-8 (a binary file or another encoding given by mistake),
    instead of a UnicodeDecodeError traceback; and `error` naming the file and the system's reason when
    it cannot be read (no permission: a PermissionError traceback before)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror or exc})") from None


def read_json(path: Path, error: type[Exception]):
    """The JSON document in `path` (a BOM allowed, as `read_utf8`); raises `error` as `<path>: not
    valid JSON (<problem>)`, a document nested too deep for the parser included."""
    text = read_utf8(path, error)
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deep)") from None
    except ValueError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None


def parse_yaml(text: str, path: Path, error: type[Exception], *, strings_only: bool = False):
    """The YAML document in `text` (read from `path`); raises `error` as `<path>:<line>: not valid
    YAML (<problem>)`. A key given twice is refused: plain YAML keeps the last one silently, so a
    second `trainer:` block would drop every key of the first. `strings_only`: every scalar stays the
    string it is written as (for names: YAML 1.1 reads `No` as False, `null` as None, `007` as 7)."""
    try:
        document = yaml.load(text, Loader=_NamesLoader if strings_only else _Loader)
    except RecursionError:  # PyYAML recurses per level: `[[[...]]]` 500 deep ends the stack
        raise error(f"{path}: not valid YAML (nested too deep)") from None
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        raise error(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML"
                    f"{f' ({problem})' if problem else ''}") from None
    if _expanded_size(document, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise error(f"{path}: its aliases expand to over {MAX_YAML_VALUES:,} values (or refer to themselves); "
                    "not a file a person wrote")
    return document


# A config or labels-fix file is a few hundred values. A few lines of nested aliases (`&a [*b, *b,
# ...]`, the "billion laughs") load as shared objects in no time, but expand to billions of values
# for anything that walks them: validating such a config ran for minutes, and its error quoted it.
MAX_YAML_VALUES = 100_000


def _expanded_size(document, limit: int) -> int:
    """How many values `document` holds with every alias expanded, counted up to just past `limit`."""
    count, stack = 0, [document]
    while stack and count <= limit:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            stack += value
    return count


class _UniqueKeys:
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float)):
                continue  # e.g. a list as a key: the loader reports it as unhashable
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{clipped_repr(key)} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _Loader(_UniqueKeys, yaml.SafeLoader):
    """SafeLoader with YAML 1.2's numbers: PyYAML follows YAML 1.1, where `max_epochs: 1:20` is 80
    (base 60), `010` is 8 (octal) and `1e-3` is a string. Here `1:20` stays a string (the config
    refuses it), `010` is 10, `0o10` 8 and `1e-3` a float."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                                 r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0) if text.startswith(("0o", "0x")) else int(text)  # int("010", 0) is an error


_Loader.add_constructor(_INT, _construct_int)


class _NamesLoader(_UniqueKeys, yaml.BaseLoader):
    pass
