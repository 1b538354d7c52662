"""``HarliConfig``: every ``--harli-*`` flag, as one typed, validated struct.

The struct is the single source of truth: each field's type, constraints, default and help text (its
``msgspec.Meta(description=...)``) are written once below. The launcher derives its flags from them with
``add_struct_flags`` (help text plus the default) and builds the config back with ``struct_from_flags``;
the scheduler receives the config pickled inside SGLang's ``ServerArgs``, and ``/harli/stats`` reports it,
so what the user asked for and what the server runs with cannot drift apart. The same descriptions appear
in the struct's JSON schema.

``add_struct_flags`` and ``struct_from_flags`` are generic (argparse and msgspec only), so any
``msgspec.Struct`` of scalar, literal, enum, path or list fields can be a command line: the benchmarks'
settings use them too.
"""

from __future__ import annotations

import argparse
import enum
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import msgspec
import msgspec.inspect as mi

PolicyName = Literal["harli", "idle-only", "naive", "static", "fixed-split"]
SloMetric = Literal["tpot", "itl"]


class HarliConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tpot_slo_ms: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="Decode time-per-output-token SLO in milliseconds, held as --harli-slo-metric says.",
        ),
    ] = 100.0

    slo_percentile: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            le=100,
            description="Percentile that must meet --harli-tpot-slo-ms (99 means p99): of requests with "
            "--harli-slo-metric tpot, of token intervals with itl.",
        ),
    ] = 99.0

    slo_metric: Annotated[
        SloMetric,
        msgspec.Meta(
            description="What the SLO is held on: tpot, each request's time per output token as "
            "sglang.bench_serving reports it, (latency - TTFT) / (output tokens - 1), so a request "
            "whose tokens came fast banks slack a later interval may spend; or itl, every token interval "
            "(the gap between two tokens of a request).",
        ),
    ] = "tpot"

    max_itl_ms: Annotated[
        Annotated[float, msgspec.Meta(ge=0)] | None,
        msgspec.Meta(
            description="With --harli-slo-metric tpot, a hard cap in milliseconds on each token interval: "
            "banked slack is never spent past it (held at --harli-slo-percentile of intervals). Unset: "
            "twice --harli-tpot-slo-ms; 0 (or none) turns the cap off.",
        ),
    ] = None

    ttft_slo_ms: Annotated[
        Annotated[float, msgspec.Meta(gt=0)] | None,
        msgspec.Meta(
            description="Time-to-first-token objective in milliseconds, for a server that prefills (not "
            "--disaggregation-mode decode): a request that arrives while finetune work runs beside decode "
            "has its prefill held one decode step (so that step keeps the interval the policy budgeted) "
            "only while its predicted TTFT stays within half of this. Unset: prefills are never held for "
            "finetune work, and TTFT attainment is reported against 5x --harli-tpot-slo-ms.",
        ),
    ] = None

    stats_window: Annotated[
        int,
        msgspec.Meta(
            ge=16,
            le=1_000_000,
            description="How many recent decode steps /harli/stats summarises (latency percentiles, SLO "
            "attainment).",
        ),
    ] = 2048

    data_dir: Annotated[
        str,
        msgspec.Meta(
            description="Directory finetune jobs may read dataset files from (dataset.path is relative to "
            "it); empty: datasets given as files are refused.",
        ),
    ] = ""

    output_dir: Annotated[
        str,
        msgspec.Meta(
            description="Where trained adapters are written, one directory per job; empty: "
            "<cache>/adapters (see HARLI_CACHE_DIR).",
        ),
    ] = ""

    idle_train_ms: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            le=10_000,
            description="With no decode work, train for up to this many milliseconds before looking for "
            "new requests again.",
        ),
    ] = 50.0

    policy: Annotated[
        PolicyName,
        msgspec.Meta(
            description="How finetune work joins decode: harli (SLO-aware, predictor-driven) or a "
            "baseline: idle-only, naive, static, fixed-split.",
        ),
    ] = "harli"

    static_units: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            le=10_000,
            description="Finetune units the static (and fixed-split) baseline admits after every decode "
            "step, whatever the latency.",
        ),
    ] = 2

    layers_per_unit: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            le=1_000,
            description="Decoder layers in one forward or backward finetune unit: the granularity of "
            "admission.",
        ),
    ] = 1

    profile: Annotated[
        Literal["auto", "skip", "refresh"],
        msgspec.Meta(
            description="Start-up profiling of finetune unit costs: auto (use the cache for this model "
            "and hardware, profile if there is none), skip, or refresh (profile again).",
        ),
    ] = "auto"

    sm_partitions: Annotated[
        Literal["auto", "off"],
        msgspec.Meta(
            description="On CUDA, let the policy run finetune work in a green context holding part of "
            "the SMs: auto or off.",
        ),
    ] = "auto"

    kv_lending: Annotated[
        Literal["auto", "off"],
        msgspec.Meta(
            description="Lend free KV-cache pages to the trainer for its activations, taken back when "
            "decode needs them: auto or off.",
        ),
    ] = "auto"

    trainer_memory_mb: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            description="Ordinary memory the trainer's activations may use beyond lent KV pages, in MiB; "
            "0: no limit.",
        ),
    ] = 0.0

    peers: Annotated[
        str,
        msgspec.Meta(
            description="The other Harli instances of this model's fleet, as comma-separated base URLs "
            "(http://host:port): a job submitted to any instance is placed where there is slack and can "
            "train on several (training.instances), every adapter version a job publishes is served on "
            "each of them too, and this instance catches up on theirs before it reports healthy; needs "
            "--admin-api-key, the same on every instance. Empty: no fleet.",
        ),
    ] = ""

    state_dir: Annotated[
        str,
        msgspec.Meta(
            description="Directory for durable finetune state (jobs, tokenized datasets, checkpoints): "
            "unfinished jobs resume after a restart and published adapters are served again; empty: "
            "jobs last one run.",
        ),
    ] = ""

    checkpoint_every_steps: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            le=1_000_000,
            description="With --harli-state-dir, checkpoint a running job every N optimizer steps (and "
            "whenever it publishes); 0: only when it publishes.",
        ),
    ] = 20

    max_jobs: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            le=100_000,
            description="Most finetune jobs queued or running at once; more are refused with 429.",
        ),
    ] = 64

    max_request_mb: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="Largest request body of a /harli or /api/v1 route (an inline dataset, a Tinker "
            "batch; a zstd body counts inflated), in MiB; larger ones are refused with 413.",
        ),
    ] = 64.0

    max_dataset_mb: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="Largest dataset file under --harli-data-dir a job may read, in MiB.",
        ),
    ] = 1024.0

    kv_poison: Annotated[
        bool,
        msgspec.Meta(
            description="Debugging: fill lent KV pages with a pattern and check, when they come back, "
            "that only the trainer wrote them (and poison them again for decode).",
        ),
    ] = False


def flag_name(field: str) -> str:
    """The launcher's option for a ``HarliConfig`` field: ``tpot_slo_ms`` -> ``--harli-tpot-slo-ms``."""
    return "--harli-" + field.replace("_", "-")


def config_from_flags(values: dict[str, object]) -> HarliConfig:
    """Build the config from parsed flag values keyed by field name (``None`` = not given), naming the
    flag on error."""
    return struct_from_flags(HarliConfig, values, flag=flag_name)


# -- msgspec struct <-> argparse ---------------------------------------------------------------------------

S = TypeVar("S", bound=msgspec.Struct)
_SEQUENCES = (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)


def _float(text: str) -> float:
    """A float flag's value; ``none`` and ``off`` read as 0 (where 0 turns something off)."""
    return 0.0 if text.strip().lower() in ("none", "off") else float(text)


_SCALARS: dict[type, Callable[[str], Any]] = {mi.IntType: int, mi.FloatType: _float, mi.StrType: str}


def add_struct_flags(
    group: argparse._ActionsContainer,
    struct_type: type[msgspec.Struct],
    *,
    flag: Callable[[str], str],
    dest_prefix: str = "",
) -> None:
    """Add one option to ``group`` (a parser or an argument group) per field of ``struct_type``.

    The option is ``flag(field.name)``, stored in ``dest_prefix + field.name`` with default ``None``, so
    that "not given" stays apart from any value and ``struct_from_flags`` lets the struct's own default
    apply. Its help is the field's ``msgspec.Meta(description=...)`` followed by ``(default: X)`` (X as
    it would be typed; ``empty`` for ``""``, ``none`` for ``None`` or an empty collection). The argparse
    shape follows the annotation, through ``Annotated`` and ``X | None``:

    - ``int``/``float``/``str`` -> ``type=`` (a float also reads ``none``/``off`` as 0); any other class
      msgspec treats as custom (``pathlib.Path``) -> ``type=`` that class, called on the string;
    - ``Literal[...]``/an ``Enum`` -> ``choices=`` (the literal values, the enum's values);
    - ``bool`` -> ``argparse.BooleanOptionalAction`` (``--x`` / ``--no-x``);
    - ``list[X]`` (also tuple/set/frozenset) -> ``nargs="+"`` with X's type and choices.

    Constraints (``gt``, ``le``, lengths) are not checked here but by ``struct_from_flags``. A required
    field (no default) gives a required option. Any other field type raises ``TypeError``.
    """
    annotations = {f.name: f.type for f in msgspec.structs.fields(struct_type)}
    for field in mi.type_info(struct_type).fields:
        description, kind = _unwrap(field.type)
        order = _literal_values(annotations[field.name])
        kwargs: dict[str, Any] = {}
        if isinstance(kind, mi.BoolType):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(kind, _SEQUENCES):
            _, item = _unwrap(kind.item_type)
            kwargs["nargs"] = "+"
            kwargs.update(_scalar_kwargs(item, order, struct_type, field.name))
        else:
            kwargs.update(_scalar_kwargs(kind, order, struct_type, field.name))
        help = description.replace("%", "%%")
        if field.required:
            kwargs["required"] = True
        else:
            default = field.default if field.default_factory is msgspec.NODEFAULT else field.default_factory()
            suffix = f"(default: {_show(default)})".replace("%", "%%")
            help = f"{help} {suffix}" if help else suffix
        group.add_argument(flag(field.name), dest=dest_prefix + field.name, default=None, help=help, **kwargs)


def struct_from_flags(
    struct_type: type[S],
    values: dict[str, object],
    *,
    flag: Callable[[str], str],
    dest_prefix: str = "",
) -> S:
    """Build ``struct_type`` from parsed option values, as ``add_struct_flags`` stored them.

    ``values`` is keyed by ``dest_prefix + field name`` (``vars(namespace)`` will do: other keys are
    ignored); ``None`` means "not given", so the field's default applies. The values are converted and
    validated with ``msgspec.convert`` (strict; a custom type such as ``pathlib.Path`` is built from a
    string). A value that fails, or a required field not given, raises
    ``ValueError("argument <flag(field)>: <what is wrong>")``, argparse's wording, so a launcher can report
    it as a one-line usage error.
    """
    fields = msgspec.structs.fields(struct_type)
    given: dict[str, object] = {}
    for field in fields:
        value = values.get(dest_prefix + field.name)
        if value is not None:
            given[field.encode_name] = value
        elif field.required:
            raise ValueError(f"argument {flag(field.name)}: required, not given")
    try:
        return msgspec.convert(given, struct_type, dec_hook=_from_string)
    except msgspec.ValidationError as exc:
        message = str(exc)
        at = re.search(r" - at `\$\.([^`\[.]+)", message)
        names = {f.encode_name: f.name for f in fields}
        if at and at.group(1) in names:
            raise ValueError(f"argument {flag(names[at.group(1)])}: {message[: at.start()]}") from None
        raise ValueError(message) from None


def _unwrap(info: mi.Type) -> tuple[str, mi.Type]:
    """(description, type) of a field's type info, through ``Annotated`` metadata and ``X | None``."""
    description = ""
    while True:
        if isinstance(info, mi.Metadata):
            description = description or (info.extra_json_schema or {}).get("description", "")
            info = info.type
        elif isinstance(info, mi.UnionType):
            others = [t for t in info.types if not isinstance(t, mi.NoneType)]
            if len(others) != 1:
                return description, info
            info = others[0]
        else:
            return description, info


def _literal_values(annotation: object) -> list[object]:
    """Every ``Literal`` value in a type annotation, in the order written (msgspec reports them sorted)."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [value for arg in get_args(annotation) for value in _literal_values(arg)]


def _scalar_kwargs(kind: mi.Type, order: list[object], struct_type: type, field: str) -> dict[str, Any]:
    if type(kind) in _SCALARS:
        return {"type": _SCALARS[type(kind)]}
    if isinstance(kind, mi.LiteralType):
        rank = {value: i for i, value in enumerate(order)}
        choices = sorted(kind.values, key=lambda value: rank.get(value, len(rank)))
    elif isinstance(kind, mi.EnumType):
        choices = [member.value for member in kind.cls]
    elif isinstance(kind, mi.CustomType):
        return {"type": kind.cls}
    else:
        raise TypeError(f"{struct_type.__name__}.{field}: no command-line form for {kind!r}")
    types = {type(choice) for choice in choices}
    return {"type": types.pop() if len(types) == 1 else str, "choices": choices}


def _show(default: object) -> str:
    if default is None or default == "":
        return "none" if default is None else "empty"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, enum.Enum):
        return _show(default.value)
    if isinstance(default, (list, tuple, set, frozenset)):
        return " ".join(_show(item) for item in default) if default else "none"
    return str(default)


def _from_string(kind: type, value: object) -> object:
    """msgspec ``dec_hook``: build a custom type (``pathlib.Path``) from the string argparse read."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        return kind(value)
    raise TypeError(f"Expected `{kind.__name__}`, got `{type(value).__name__}`")
