"""What a ``/harli`` request can be refused for, typed by meaning, and the one map to HTTP statuses.

Code that refuses raises the error that says why (a malformed field, no such job, the server is full);
only the edges, the scheduler's control dispatcher and the HTTP routes, turn it into a status, through
``http_status``. Every error names the request part at fault in ``field`` (a spec field such as
``training.epochs``, ``body``, or a dataset record), which the client receives beside the message.
"""

from __future__ import annotations


class HarliError(Exception):
    """A request Harli refuses; ``field`` is the part of the request at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # the default would call __init__ with the joined string only
        return (type(self), (self.field, self.message))

    @property
    def status(self) -> int:
        return http_status(self)

    def body(self) -> dict[str, str]:
        """The JSON body the client gets (``openapi.ERROR_SCHEMA``)."""
        return {"error": str(self), "field": self.field}


class SpecError(HarliError, ValueError):
    """The request is malformed, or asks for something this server cannot serve (LoRA off, a rank
    above ``--max-lora-rank``, a dataset that cannot be read)."""


class SpecInvalid(SpecError):
    """Well-formed JSON whose fields break the schema: a wrong type, a value out of range, a
    contradiction between fields."""

    @classmethod
    def from_validation(cls, exc: Exception) -> SpecInvalid:
        """From msgspec's ``ValidationError``: its ``- at `$.<path>``` suffix becomes ``field``."""
        message = str(exc)
        field = message.rsplit(" - at `$.", 1)[1].rstrip("`") if " - at `$." in message else "body"
        return cls(field, message.split(" - at ")[0])


class Unauthorized(HarliError):
    """A fleet peer route was called without the admin key."""


class Forbidden(HarliError):
    """A fleet peer route on an instance with no admin key: such calls are never accepted."""


class NotFound(HarliError):
    """No job (or job version) by that name."""


class Conflict(HarliError):
    """The name is taken (a job or a served adapter), or the job is already finished."""


class TooLarge(HarliError):
    """The request body is larger than ``--harli-max-request-mb``."""


class TooManyJobs(HarliError):
    """``--harli-max-jobs`` jobs are queued or running already; retry later."""


class NotAvailable(HarliError):
    """This server configuration cannot do it (finetuning or evaluation with ``--tp-size`` > 1)."""


class Unavailable(HarliError):
    """An instance of the fleet it needs is down or cannot finetune now, or too few are alive; retry."""


class StorageFailed(HarliError):
    """The job could not be recorded under ``--harli-state-dir`` (disk full, permissions)."""


HTTP_STATUS: dict[type[HarliError], int] = {
    SpecError: 400,
    SpecInvalid: 422,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    TooManyJobs: 429,
    NotAvailable: 501,
    Unavailable: 503,
    StorageFailed: 507,
}


def http_status(exc: BaseException) -> int:
    """The status a route answers ``exc`` with: its own class's, else its nearest base's; 500 for an
    exception that is not a refusal at all (a bug, which the dispatcher logs)."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400 if isinstance(exc, HarliError) else 500
