"""The error tree's cross-thread and cross-process behaviour (PipelineError's traceback)."""

from __future__ import annotations

import pickle
import threading

from fastfeed.errors import FastfeedError, PipelineError


def _raised_in_a_thread() -> PipelineError:
    """A PipelineError made the way the IO thread makes one: the unexpected exception as its
    cause, no traceback text."""
    out: list[PipelineError] = []

    def fail() -> None:
        try:
            {}["missing"]
        except KeyError as exc:
            err = PipelineError("unexpected error fetching bytes 0-9: KeyError", url="s3://b/k", stage="fetch")
            err.__cause__ = exc
            out.append(err)

    thread = threading.Thread(target=fail)
    thread.start()
    thread.join()
    return out[0]


def test_a_pipeline_errors_traceback_is_formatted_by_the_thread_that_reads_it() -> None:
    err = _raised_in_a_thread()
    assert err._remote_traceback == "", "nothing was formatted in the background thread"
    text = err.remote_traceback
    assert "KeyError: 'missing'" in text and "in fail" in text
    assert isinstance(err, FastfeedError) and err.url == "s3://b/k" and err.stage == "fetch"


def test_a_pipeline_error_takes_its_traceback_text_across_processes() -> None:
    err = _raised_in_a_thread()
    copy = pickle.loads(pickle.dumps(err))
    assert copy.__cause__ is None, "the cause does not cross"
    assert "KeyError: 'missing'" in copy.remote_traceback and copy.stage == "fetch"
    given = pickle.loads(pickle.dumps(PipelineError("x", stage="parse", remote_traceback="worker text")))
    assert given.remote_traceback == "worker text"
