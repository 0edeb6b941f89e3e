"""Whether the MLflow tracking server answers, and the one paragraph to show when it does not.

Kept free of torch and MLflow so the command line can ask before loading anything heavy.
"""

from __future__ import annotations

import time


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer; ``str()`` is the paragraph shown to the user (``advice`` says what to do)."""

    def __init__(self, uri: str, doing: str, seconds: float, cause: BaseException):
        super().__init__(uri, doing, seconds)
        self.uri, self.doing, self.seconds, self.cause = uri, doing, seconds, short(cause)
        self.advice = ("Start the server (or fix MLFLOW_TRACKING_URI; unset it to use the embedded store "
                       "mlruns/mlflow.db) and run the command again.")

    def __str__(self) -> str:
        waited = f" and did not come back within {self.seconds:.0f} s (tracking.retry_seconds)" if self.seconds else ""
        return (f"cannot reach the MLflow tracking server at {self.uri} ({self.cause}) while {self.doing}{waited}. "
                f"{self.advice}")


def short(err: BaseException) -> str:
    """A few words for what went wrong, e.g. 'connection refused', instead of urllib3's nested repr."""
    text = " ".join(str(e) for e in _chain(err))
    for marker, words in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("RemoteDisconnected", "connection dropped")):
        if marker in text:
            return words
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}" if str(err) else type(err).__name__


def _chain(err: BaseException | None):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def unreachable(err: BaseException) -> bool:
    """True for failures that a server coming back would cure: no connection, a timeout, a 502/503/504."""
    import requests

    for e in _chain(err):
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          requests.exceptions.RetryError, ConnectionError, TimeoutError)):
            return True
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (502, 503, 504) or (hasattr(e, "get_http_status_code")
                                         and e.get_http_status_code() in (502, 503, 504)):
            return True
    return False


def probe(uri: str, attempts: int = 3) -> None:
    """Fail in seconds, before any data or model is loaded, when an HTTP tracking server cannot be reached."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    for attempt in range(attempts):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5)  # any answer will do: the server is there
            return
        except requests.exceptions.RequestException as err:
            if attempt == attempts - 1:
                raise TrackingUnavailable(uri, "checking it before the run", 0, err) from err
            time.sleep(0.5 * (attempt + 1))
