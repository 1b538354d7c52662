"""A PD-decode server refuses requests without bootstrap fields (HTTP 400) instead of dying on them.

Why: on a ``--disaggregation-mode decode`` server every request must say where its KV cache comes from:
``bootstrap_host`` (and ``bootstrap_port``) of the prefill server and the transfer's ``bootstrap_room``.
SGLang 0.5.23 does not check this on admission. A request without ``bootstrap_host`` reaches the scheduler,
whose ``DecodePreallocQueue._create_receiver_and_enqueue`` builds ``NetworkAddress(None, port)``
(``sglang/srt/disaggregation/decode.py:155``, ``_bootstrap_addr``), which raises ``AttributeError`` in
``sglang/srt/utils/network.py:548``; the scheduler process dies and SIGQUIT takes the whole server down,
with every other client's request. ``bootstrap_room`` is needed by every real transfer backend (the fake one
makes one up, ``tokenizer_manager.py:1576``); we require both, as a router would send them.

How: the check runs where every entry point meets, ``TokenizerManager.generate_request`` (native
``/generate``, the OpenAI ``/v1/completions`` and ``/v1/chat/completions`` whose ``PDRoutingFields`` carry
the same fields, and the ``Engine``), in the main process, before SGLang normalizes the request. A missing
field raises ``ValueError``, which SGLang's own handlers turn into HTTP 400 with the message (a streaming
native ``/generate`` reports it as an SSE ``error`` event, as it does for every invalid request). SGLang's
own health-check and warmup requests carry the fake bootstrap fields, so they pass. We subclass the
tokenizer manager and rebind the name ``sglang.srt.entrypoints.engine.init_tokenizer_manager`` looks up,
the same seam as ``HarliScheduler``; valid requests get SGLang's own generator, untouched. Not covered:
``--tokenizer-worker-num > 1``, whose tokenizer workers live in processes of their own.
"""

from __future__ import annotations

from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.managers.io_struct import GenerateReqInput

_FIELDS = ("bootstrap_host", "bootstrap_room")
_WHY = (
    " on a PD decode server (--disaggregation-mode decode): every request must name its prefill server"
    " (bootstrap_host, bootstrap_port) and its KV transfer room (bootstrap_room)"
)


def _missing(value) -> bool:
    return value is None or value == ""


def bootstrap_error(obj) -> str | None:
    """Why ``obj`` (a raw, not yet normalized request) cannot be served in PD decode mode, or None."""
    if not isinstance(obj, GenerateReqInput):
        return None
    for field in _FIELDS:
        value = getattr(obj, field)
        if isinstance(value, list):  # a batch: one value per item (a scalar is broadcast by SGLang)
            bad = [i for i, v in enumerate(value) if _missing(v)]
            if bad:
                return f"{field} is missing for batch item(s) {bad}{_WHY}"
        elif _missing(value):
            return f"{field} is required{_WHY}"
    return None


async def _refused(obj: GenerateReqInput, message: str):
    # Normalized as SGLang's generate_request would have: the stream's abort task reads obj.is_single and
    # obj.rid. Only a refused request is normalized here, since SGLang's normalization is not idempotent.
    obj.normalize_batch_and_arguments()
    raise ValueError(message)
    yield  # an async generator, like the method it stands in for


class _PDGuardMixin:
    _harli_pd_guard = True

    def generate_request(self, obj, request=None):
        if self.disaggregation_mode == DisaggregationMode.DECODE:
            error = bootstrap_error(obj)
            if error is not None:
                return _refused(obj, error)
        return super().generate_request(obj, request)


def install_pd_guard() -> None:
    """Make the tokenizer manager that ``launch_server`` creates in this process refuse PD-decode requests
    without bootstrap fields. Idempotent; call it before ``launch_server``. Harmless outside decode mode."""
    from sglang.srt.entrypoints import engine

    base = engine.TokenizerManager
    if getattr(base, "_harli_pd_guard", False):
        return
    engine.TokenizerManager = type(base.__name__, (_PDGuardMixin, base), {"__module__": __name__})
