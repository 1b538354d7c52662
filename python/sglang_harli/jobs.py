"""``python -m sglang_harli.jobs``: submit, follow, list and cancel finetune jobs on a running server.

A thin client of the ``/harli/jobs`` HTTP API, so the server stays the only judge of a spec: every refusal
is printed as the server worded it (``error: lora.r: ...``) and the exit code says which kind of outcome
it was (0 done, 1 the job failed or was cancelled, 2 the request itself failed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any
from urllib.parse import quote

import requests
from tqdm import tqdm

DEFAULT_URL = "http://127.0.0.1:30000"
POLL_S = 0.5
FINISHED = ("completed", "failed", "cancelled")
EXIT_OK, EXIT_JOB_FAILED, EXIT_ERROR = 0, 1, 2


class CliError(Exception):
    """Ends the command with ``error: <message>`` on stderr and exit code 2, never a traceback."""


class Client:
    def __init__(self, url: str, api_key: str | None, admin_api_key: str | None = None):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # SGLang takes only the admin key on admin routes when the server has one.
        self.admin_headers = {"Authorization": f"Bearer {admin_api_key}"} if admin_api_key else self.headers

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 60, admin: bool = False
    ) -> Any:
        headers = self.admin_headers if admin else self.headers
        try:
            resp = requests.request(method, self.url + path, json=body, headers=headers, timeout=timeout)
        except requests.ConnectionError:
            raise CliError(
                f"cannot reach a server at {self.url}; is it running? (pass --url or set HARLI_URL)"
            ) from None
        except requests.Timeout:
            raise CliError(f"the server at {self.url} did not answer within {timeout:g} s") from None
        except requests.RequestException as exc:
            raise CliError(f"cannot talk to {self.url} (check --url): {exc}") from None
        if resp.status_code >= 400:
            raise CliError(_error_message(resp))
        try:
            return resp.json()
        except ValueError:
            raise CliError(f"the server at {self.url} sent a non-JSON reply: {resp.text[:200]!r}") from None

    def job(self, name: str) -> dict:
        return _first_rank(self.request("GET", job_path(name)))


def job_path(name: str, action: str = "") -> str:
    return f"/harli/jobs/{quote(name, safe='')}{action}"


def _error_message(resp: requests.Response) -> str:
    """The server's own words: ``{"error": ...}`` from Harli and SGLang, ``{"detail": ...}`` from FastAPI."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            if body.get(key):
                value = body[key]
                return value if isinstance(value, str) else json.dumps(value)
    text = resp.text.strip()
    return text[:500] if text else f"HTTP {resp.status_code} {resp.reason}"


def _first_rank(body: Any) -> Any:
    """With several DP ranks the server answers ``{"dp_ranks": [...]}``; they agree on job state."""
    if isinstance(body, dict) and isinstance(body.get("dp_ranks"), list) and body["dp_ranks"]:
        return body["dp_ranks"][0]
    return body


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# --- spec building -----------------------------------------------------------------------------------


def load_spec(args: argparse.Namespace) -> dict:
    """The spec file (or stdin) with the command-line overrides applied; only given flags override."""
    if args.spec is not None:
        try:
            text = sys.stdin.read() if args.spec == "-" else open(args.spec, encoding="utf-8").read()
        except OSError as exc:
            raise CliError(f"cannot read {args.spec}: {exc.strerror}") from None
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CliError(f"{args.spec} is not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise CliError(f"{args.spec} must hold a JSON object (the job spec)")
    elif args.data is not None:
        spec = {}
    else:
        raise CliError("give a spec file (or - for stdin), or --name and --data for a minimal job")
    if args.name is not None:
        spec["name"] = args.name
    if args.data is not None:
        spec["dataset"] = {"path": args.data}
    if "name" not in spec:
        raise CliError("the job needs a name: put it in the spec or pass --name")
    for section, key, value in (
        ("training", "epochs", args.epochs),
        ("lora", "r", args.rank),
        ("training", "learning_rate", args.lr),
    ):
        if value is not None:
            if not isinstance(spec.setdefault(section, {}), dict):
                raise CliError(f"{section} in the spec must be an object to override {section}.{key}")
            spec[section][key] = value
    return spec


# --- following a job ---------------------------------------------------------------------------------


def follow(client: Client, name: str) -> int:
    """Poll the job until it finishes, drawing progress on stderr, then print the summary on stdout."""
    status = client.job(name)
    bar = tqdm(  # starting at the current step keeps the rate honest when following a job midway
        total=status["total_steps"] or None,
        initial=status["step"],
        unit="step",
        desc=name,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        while True:
            if status["total_steps"] and bar.total != status["total_steps"]:
                bar.total = status["total_steps"]
            bar.set_description(f"{name} [{status['state']}]", refresh=False)
            bar.set_postfix(progress_fields(status), refresh=False)
            bar.update(max(0, status["step"] - bar.n))
            bar.refresh()
            if status["state"] in FINISHED:
                break
            time.sleep(POLL_S)
            status = client.job(name)
    except KeyboardInterrupt:
        bar.close()  # before the message, so it lands on its own line
        print(
            f"stopped following; job {name!r} keeps running on the server "
            f"(python -m sglang_harli.jobs cancel {name} stops it)",
            file=sys.stderr,
        )
        return 130
    finally:
        bar.close()
    print(summary(status))
    return EXIT_OK if status["state"] == "completed" else EXIT_JOB_FAILED


def progress_fields(status: dict) -> dict[str, str]:
    """The progress line's fields: loss and throughput, then the latest evaluation's, if any."""
    fields = {"loss": _fmt(status["loss"], ".4f"), "tok/s": _fmt(status["tokens_per_s"], ".0f")}
    if status.get("eval_loss") is not None:
        fields["eval"] = _fmt(status["eval_loss"], ".4f")
        fields["acc"] = _fmt(status.get("eval_accuracy"), ".3f")
    if status.get("retention_kept") is not None:
        fields["kept"] = f"{status['retention_kept']}/{status['retention_total']}"
    return fields


def _rehearsal(status: dict) -> str:
    count = status.get("rehearsal_examples") or 0
    return f" (+{count} rehearsal answers)" if count else ""


def summary(status: dict) -> str:
    lines = [
        f"job {status['name']}: {status['state']}",
        f"  step {status['step']}/{status['total_steps']}, epoch {status['epoch']}/{status['epochs']}, "
        f"{status['examples']} examples{_rehearsal(status)}, {status['tokens_trained']} tokens trained",
        f"  loss {_fmt(status['loss'], '.4f')}, {_fmt(status['tokens_per_s'], '.1f')} tokens/s",
    ]
    if status.get("evals"):
        parts = []
        if status.get("eval_loss") is not None:
            accuracy = _fmt(status["eval_accuracy"], ".3f")
            parts.append(f"eval loss {status['eval_loss']:.4f}, accuracy {accuracy}")
        if status.get("retention_kept") is not None:
            parts.append(f"retention kept {status['retention_kept']}/{status['retention_total']}")
        if status.get("best_step") is not None:
            parts.append(f"best at step {status['best_step']}")
        stopped = " (stopped early)" if status.get("stopped_early") else ""
        lines.append("  " + ", ".join(parts) + stopped)
    if status.get("started_at") and status.get("finished_at"):
        lines.append(f"  trained for {status['finished_at'] - status['started_at']:.1f} s")
    published = status.get("published") or []
    if published and published[-1].get("retention_kept") is not None:
        last = published[-1]
        lines.append(
            f"  published the adapter of step {last['step']}: retention kept "
            f"{last['retention_kept']}/{last['retention_total']}"
        )
    if status.get("floor_breaches"):
        lines.append(f"  {status['floor_breaches']} evaluations below the retention floor")
    if status.get("adapter_path"):
        lines.append(f"  adapter {status['adapter_path']}")
    if status.get("unpublished_path"):
        lines.append(f"  not published (forgot): {status['unpublished_path']}")
    if status["state"] == "completed":
        lines.append(f"  served as lora_path={status['name']}")
    if status.get("error"):
        lines.append(f"  error: {status['error']}")
    return "\n".join(lines)


# --- commands ----------------------------------------------------------------------------------------


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    spec = load_spec(args)
    status = _first_rank(client.request("POST", "/harli/jobs", spec, timeout=600, admin=True))
    if args.wait:
        return follow(client, status["name"])
    print(json.dumps(status, indent=2))
    return EXIT_OK


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    body = client.request("GET", "/harli/jobs")
    if args.json:
        print(json.dumps(body, indent=2))
        return EXIT_OK
    rows = [("NAME", "STATE", "STEP", "LOSS", "TOKENS/S")]
    for job in _first_rank(body):
        rows.append(
            (
                job["name"],
                job["state"],
                f"{job['step']}/{job['total_steps']}",
                _fmt(job["loss"], ".4f"),
                _fmt(job["tokens_per_s"], ".1f"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    if args.wait:
        return follow(client, args.name)
    print(json.dumps(client.request("GET", job_path(args.name)), indent=2))
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(client.request("POST", job_path(args.name, "/cancel"), {}, admin=True), indent=2))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_harli.jobs", description="Manage finetune jobs on a sglang_harli server."
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("HARLI_URL") or DEFAULT_URL,
        help="server address (default: $HARLI_URL or %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("HARLI_API_KEY") or os.environ.get("SGLANG_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $HARLI_API_KEY, then $SGLANG_API_KEY)",
    )
    parser.add_argument(
        "--admin-api-key",
        default=os.environ.get("HARLI_ADMIN_API_KEY"),
        help="key for submit and cancel when the server has --admin-api-key (default: $HARLI_ADMIN_API_KEY)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", help="queue a job from a spec file, or from --name and --data")
    submit.add_argument("spec", nargs="?", metavar="SPEC.json", help="job spec file, or - for stdin")
    submit.add_argument("--name", help="job name (also the adapter's lora_path once served)")
    submit.add_argument("--data", metavar="PATH", help="dataset JSONL, relative to the server's data dir")
    submit.add_argument("--epochs", type=int, help="override training.epochs")
    submit.add_argument("--rank", type=int, help="override lora.r")
    submit.add_argument("--lr", type=float, help="override training.learning_rate")
    submit.add_argument("--wait", action="store_true", help="follow the job until it finishes")
    submit.set_defaults(run=cmd_submit)

    listing = commands.add_parser("list", help="every job of this server run")
    listing.add_argument("--json", action="store_true", help="print the raw JSON")
    listing.set_defaults(run=cmd_list)

    status = commands.add_parser("status", help="one job's status as JSON")
    status.add_argument("name")
    status.add_argument("--wait", action="store_true", help="follow the job until it finishes")
    status.set_defaults(run=cmd_status)

    cancel = commands.add_parser("cancel", help="stop a queued or running job")
    cancel.add_argument("name")
    cancel.set_defaults(run=cmd_cancel)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(Client(args.url, args.api_key, args.admin_api_key), args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
