"""``add_struct_flags`` / ``struct_from_flags``: a msgspec struct as a command line, help written once."""

import argparse
import enum
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import pytest

from sglang_harli.core import config as config_module
from sglang_harli.core.config import (
    HarliConfig,
    add_struct_flags,
    config_from_flags,
    flag_name,
    struct_from_flags,
)


def dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    loads: Annotated[list[Annotated[float, msgspec.Meta(gt=0)]], msgspec.Meta(description="Loads, 100%.")] = (
        msgspec.field(default_factory=lambda: [0.5, 1.0])
    )
    policies: list[Literal["static", "harli"]] = msgspec.field(default_factory=lambda: ["harli"])
    json: Annotated[Path | None, msgspec.Meta(description="Write results here.")] = None
    color: Color = Color.BLUE
    verbose: bool = False
    seconds: Annotated[int, msgspec.Meta(ge=1, description="Run length.")]


def parser_for(struct_type=Settings, prefix=""):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_struct_flags(parser, struct_type, flag=dashed, dest_prefix=prefix)
    return parser


def test_every_harli_field_has_its_help_once_with_the_default_appended():
    assert not hasattr(config_module, "FIELD_HELP")
    parser = argparse.ArgumentParser()
    add_struct_flags(parser, HarliConfig, flag=flag_name, dest_prefix="harli_")
    actions = {a.dest: a for a in parser._actions}
    for field in msgspec.structs.fields(HarliConfig):
        action = actions[f"harli_{field.name}"]
        assert action.option_strings[0] == flag_name(field.name) and action.default is None
        assert len(action.help) > 30 and "(default: " in action.help, field.name
    assert actions["harli_tpot_slo_ms"].help.endswith("(default: 100.0)")
    assert actions["harli_output_dir"].help.endswith("(default: empty)")
    assert actions["harli_profile"].choices == ["auto", "skip", "refresh"]  # as written, not sorted
    assert isinstance(actions["harli_kv_poison"], argparse.BooleanOptionalAction)
    schema = msgspec.json.schema(HarliConfig)["$defs"]["HarliConfig"]["properties"]
    assert schema["tpot_slo_ms"]["description"] == actions["harli_tpot_slo_ms"].help.rsplit(" (default", 1)[0]


def test_harli_flags_parse_as_before():
    parser = argparse.ArgumentParser()
    add_struct_flags(parser, HarliConfig, flag=flag_name, dest_prefix="harli_")
    ns = parser.parse_args(["--harli-tpot-slo-ms", "42", "--harli-kv-poison", "--harli-policy", "static"])
    config = struct_from_flags(HarliConfig, vars(ns), flag=flag_name, dest_prefix="harli_")
    assert config == HarliConfig(tpot_slo_ms=42.0, kv_poison=True, policy="static")
    ns = parser.parse_args(["--no-harli-kv-poison"])
    assert ns.harli_kv_poison is False
    assert config_from_flags({"kv_poison": None, "max_jobs": 3}) == HarliConfig(max_jobs=3)
    with pytest.raises(ValueError, match=r"^argument --harli-slo-percentile: Expected `float` <= 100"):
        config_from_flags({"slo_percentile": 101.0})


def test_a_generic_struct_round_trips_lists_paths_literals_enums_and_bools():
    parser = parser_for()
    help = {a.dest: a.help for a in parser._actions}
    assert help["loads"] == "Loads, 100%%. (default: 0.5 1.0)"  # escaped for argparse
    assert help["json"] == "Write results here. (default: none)"
    assert help["color"] == "(default: blue)" and help["verbose"] == "(default: off)"
    assert help["seconds"] == "Run length."
    assert "Loads, 100%." in " ".join(parser.format_help().split())
    argv = ["--seconds", "3", "--loads", "1", "2.5", "--policies", "static", "harli", "--json", "out.json"]
    ns = parser.parse_args([*argv, "--color", "red", "--verbose"])
    settings = struct_from_flags(Settings, vars(ns), flag=dashed)
    assert settings == Settings(
        seconds=3,
        loads=[1.0, 2.5],
        policies=["static", "harli"],
        json=Path("out.json"),
        color=Color.RED,
        verbose=True,
    )
    defaults = struct_from_flags(Settings, vars(parser.parse_args(["--seconds", "1"])), flag=dashed)
    assert defaults == Settings(seconds=1)


def test_errors_name_the_flag():
    parser = parser_for(prefix="x_")
    with pytest.raises(argparse.ArgumentError, match="invalid choice"):
        parser.parse_args(["--seconds", "1", "--policies", "naive"])
    with pytest.raises(ValueError, match=r"^argument --loads: Expected `float` > 0"):
        struct_from_flags(Settings, {"x_seconds": 1, "x_loads": [1.0, -1.0]}, flag=dashed, dest_prefix="x_")
    with pytest.raises(ValueError, match=r"^argument --seconds: Expected `int` >= 1"):
        struct_from_flags(Settings, {"x_seconds": 0}, flag=dashed, dest_prefix="x_")
    with pytest.raises(ValueError, match=r"^argument --seconds: required"):
        struct_from_flags(Settings, {"seconds": 5}, flag=dashed, dest_prefix="x_")
    with pytest.raises(ValueError, match=r"^argument --json: Expected `Path`, got `int`"):
        struct_from_flags(Settings, {"seconds": 1, "json": 7}, flag=dashed)


def test_a_field_without_a_command_line_form_is_refused():
    class Nested(msgspec.Struct):
        table: dict[str, int] = {}

    with pytest.raises(TypeError, match=r"Nested\.table"):
        parser_for(Nested)


def test_the_launchers_help_lists_every_harli_flag_with_its_default():
    from sglang_harli.launch_server import build_parser

    text = " ".join(build_parser().format_help().split())
    for field in msgspec.structs.fields(HarliConfig):
        assert flag_name(field.name) in text
    assert "(SLO-aware, predictor-driven)" in text and "(default: harli)" in text
    assert "--harli-kv-poison, --no-harli-kv-poison" in text
