"""The one YAML reader of raytrain: configs, --set values, class maps, the config inside a checkpoint.

Safe (no Python objects) and without aliases: `*name` repeats a node by reference, so a few lines
of nested aliases expand to billions of entries once validated, dumped or copied. raytrain's YAML
never needs them. A key given twice in one mapping is refused too: YAML would keep the last
silently, so the first, which the reader sees, would not be what runs.
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from raytrain.errors import ConfigError
from raytrain.storage.paths import RemotePath
from raytrain.storage.reading import CONFIG_BYTES, read_bounded

ALIASES_REFUSED = "YAML aliases (*name) are not allowed"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without aliases or duplicate keys."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _Refused(None, None, ALIASES_REFUSED, self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: {...}` merges keys; the mapping's own win by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
            if duplicate:
                raise _Refused(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses, but that raytrain does not take: its message is said as it is."""


def load_yaml(text: str, source: Any, error: type[Exception] = ConfigError) -> Any:
    """Parse YAML that raytrain reads (configs, --set values, class maps, saved configs) safely and
    without aliases or duplicate keys; any problem is `error` naming `source` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        what = problem if isinstance(err, _Refused) else f"not valid YAML ({problem})"
        raise error(f"{source}:{where} {what}") from None


def load_yaml_file(path: Any, error: type[Exception] = ConfigError, kind: str = "config") -> Any:
    """`load_yaml` of a file (a config, or the `kind` it is): one that cannot be read (storage.reading:
    a regular file within CONFIG_BYTES), or is not UTF-8 text (a binary file, UTF-16), is `error`
    naming it, like a YAML mistake."""
    if isinstance(path, (str, os.PathLike, RemotePath)):
        data = read_bounded(path, CONFIG_BYTES, kind, error)
    else:  # a config shipped inside the package, as importlib.resources gives it (perhaps from a zip)
        data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte order mark is harmless, so allowed
    except UnicodeDecodeError as err:
        utf16 = " (it is UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise error(f"{path}: not UTF-8 text{utf16}, byte {err.start} is {data[err.start]:#04x}; raytrain reads YAML in UTF-8") from None
    return load_yaml(text, path, error)


def yaml_value(text: str) -> Any:
    """A value typed on the command line (`--set key=VALUE`) as YAML reads it: a number, a list, a
    bool; text that is not valid YAML stays the text it is, and empty text is "". Aliases and
    duplicate keys are a ValueError."""
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as err:
        raise ValueError(err.problem) from None
    except yaml.YAMLError:
        return text
