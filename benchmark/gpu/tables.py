"""The markdown tables of every part that ran: printed at the end of a run, and ``RESULTS.md``'s gpu
section."""

from __future__ import annotations

import math
from typing import Any


def _f(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _pct(value: float | None) -> str:
    return _f(None if value is None else 100 * value, ".1f")


def tables(result: dict[str, Any]) -> str:
    """Markdown tables of every part that ran: printed at the end, and ``RESULTS.md``'s gpu section."""
    parts = result.get("parts", {})
    status = [[name, p.get("status", "-"), _f(p.get("seconds"), ".0f")] for name, p in parts.items()]
    blocks = [_table(["part", "status", "seconds"], status)]
    p = parts.get("ceilings", {})
    if p.get("status") == "ok":
        matmul = f"{p['matmul_tflops']:.1f} TFLOP/s (best {p['matmul_tflops_best']:.1f})"
        copy = f"{p['copy_gbps']:.0f} GB/s (best {p['copy_gbps_best']:.0f})"
        rows = [
            [f"{p['matmul_dtype']} matmul", matmul, f"{p['matmul_n']}^3, {p['timing']}"],
            ["copy bandwidth", copy, f"{p['copy_bytes'] / 2**20:.0f} MiB read + written"],
        ]
        blocks.append(_table(["ceiling", "measured", "how"], rows))
    p = parts.get("trainer", {})
    if p.get("status") == "ok":
        rows = [
            [side, str(e["repeat"]), f"{e['tokens_per_s']:.0f}", _pct(e["mfu"]), _f(e["final_loss"], ".4f"),
             _f(e["peak_memory_gib"], ".1f")]
            for side in ("ours", "reference") for e in p[side]
        ]  # fmt: skip
        blocks.append(_table(["trainer", "repeat", "tokens/s", "MFU %", "final loss", "peak GiB"], rows))
    p = parts.get("decode", {})
    if p.get("status") == "ok":
        rows = [
            [str(r["batch"]), str(r["context"]), r.get("skipped") or _f(r["step_ms"], ".3f"),
             _f(r.get("p90_ms"), ".3f"), _f(r.get("achieved_gbps"), ".0f"), _pct(r.get("bandwidth_share"))]
            for r in p["rows"]
        ]  # fmt: skip
        blocks.append(_table(["batch", "context", "step ms", "p90 ms", "GB/s", "% of copy bw"], rows))
    p = parts.get("corun", {})
    if p.get("status") == "ok":
        rows = [
            [r["split"], str(r["batch"]), str(r["context"]), str(r["units"]), _f(r["decode_ms"], ".3f"),
             _f(r["inflation"], ".2f"), _f(r["interval_ms"], ".3f"), _f(r["finetune_tokens_per_s"], ".0f")]
            for r in p["rows"]
        ]  # fmt: skip
        header = [
            "split",
            "batch",
            "context",
            "units",
            "decode ms",
            "inflation",
            "interval ms",
            "finetune tok/s",
        ]
        blocks.append(_table(header, rows))
        predictor = p["predictor"]
        corun = ", ".join(f"{k} {_pct(v)}%" for k, v in predictor["corun_mape"].items())
        blocks.append(f"predictor MAPE: solo {_pct(predictor['solo_mape'])}%; co-run {corun}")
    p = parts.get("replay", {})
    if p.get("status") == "ok":
        rows = [
            [f"`{r['policy']}`" + (f" ({r['static_units']}/step)" if r["static_units"] is not None else ""),
             _f(r["slo_attainment"], ".4f"), _f(r["tpot_p50_ms"], ".2f"), _f(r["tpot_p99_ms"], ".2f"),
             _f(r.get("itl_attainment"), ".4f"), _f(r.get("itl_p99_ms"), ".2f"),
             _f(r["finetune_tokens_per_s"], ".0f"), _f(r["mean_batch"], ".1f"),
             ", ".join(f"{k} {v}" for k, v in r["split_units"].items() if v)]
            for r in p["runs"]
        ]  # fmt: skip
        header = [
            "policy", "SLO att. (requests)", "TPOT p50 ms", "TPOT p99 ms", "ITL att.", "ITL p99 ms",
            "finetune tok/s", "mean batch", "units",
        ]  # fmt: skip
        blocks.append(_table(header, rows))
        gain = p["gain"]
        versus = f"{gain['ratio']:.2f}x over `{gain['best']}`" if gain["ratio"] is not None else "-"
        note = f" ({gain['note']})" if gain["note"] else ""
        blocks.append(
            f"replay: SLO {p['slo_ms']:.2f} ms; harli vs the best SLO-holding baseline: {versus}{note}"
        )
    return "\n\n".join(blocks)
