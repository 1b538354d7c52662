"""Benchmark command lines derived from their ``Settings`` structs, so each default and help text is
written once, on the struct's field (``msgspec.Meta(description=...)``), by ``core.config``'s generic
``add_struct_flags`` and ``struct_from_flags``."""

from __future__ import annotations

import argparse
from typing import TypeVar

import msgspec

from sglang_harli.core.config import add_struct_flags, struct_from_flags

SHORT_FLAGS = {"duration_s": "--duration", "period_s": "--period"}
"""Fields whose flags predate the struct and keep their shorter names."""
S = TypeVar("S", bound=msgspec.Struct)


def flag_name(field: str) -> str:
    """A settings field's option: ``slo_ms`` -> ``--slo-ms``, ``duration_s`` -> ``--duration``."""
    return SHORT_FLAGS.get(field, "--" + field.replace("_", "-"))


def add_settings_flags(parser: argparse.ArgumentParser, settings_type: type[msgspec.Struct]) -> None:
    """One option per field of ``settings_type``, its help the field's description plus its default."""
    add_struct_flags(parser, settings_type, flag=flag_name)


def settings_from_flags(
    parser: argparse.ArgumentParser, settings_type: type[S], args: argparse.Namespace
) -> S:
    """The settings the options asked for (a field's default where not given); a bad value is a usage
    error naming its option."""
    try:
        return struct_from_flags(settings_type, vars(args), flag=flag_name)
    except ValueError as exc:
        parser.error(str(exc))  # exits
