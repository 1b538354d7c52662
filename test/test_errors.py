"""Refusals are typed by meaning and mapped to HTTP statuses in one place (``core.errors``)."""

import pickle

import pytest

from sglang_harli.core import errors
from sglang_harli.core.errors import http_status
from sglang_harli.core.jobs.book import JobBook
from sglang_harli.core.jobs.data import DatasetError
from sglang_harli.core.jobs.spec import FinetuneJobSpec, decode_spec


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.SpecError, 400),
        (errors.SpecInvalid, 422),
        (DatasetError, 400),
        (errors.NotFound, 404),
        (errors.Conflict, 409),
        (errors.TooLarge, 413),
        (errors.TooManyJobs, 429),
        (errors.NotAvailable, 501),
        (errors.StorageFailed, 507),
    ],
)
def test_each_refusal_has_its_status_and_names_its_field(error, status):
    exc = error("training.epochs", "must be at least 1")
    assert http_status(exc) == exc.status == status
    assert exc.body() == {"error": "training.epochs: must be at least 1", "field": "training.epochs"}
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is error and again.field == "training.epochs"


def test_a_bug_is_a_500_not_a_refusal():
    assert http_status(KeyError("x")) == 500


def test_the_job_book_refuses_by_meaning():
    book = JobBook()
    spec = decode_spec(b'{"name": "a", "dataset": {"records": [{"text": "hi"}]}}')
    assert isinstance(spec, FinetuneJobSpec)
    job = book.submit(spec, examples=1, total_steps=1, output_dir="/tmp/a")
    with pytest.raises(errors.Conflict):
        book.submit(spec, examples=1, total_steps=1, output_dir="/tmp/a")
    with pytest.raises(errors.NotFound):
        book.get("b")
    with pytest.raises(errors.SpecInvalid):
        decode_spec(b'{"name": "a", "dataset": {"records": [{"text": "hi"}]}, "training": {"epochs": 0}}')
    book.start(job)
    book.trained(job)  # its final adapter is written: it waits to be served, and still counts as active
    assert job.state == "publishing" and book.active() == 1
    book.finish(job, "completed")
    with pytest.raises(errors.Conflict):
        book.cancel("a")
