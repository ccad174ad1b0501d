"""Every error the engine raises on purpose, in one place.

User-facing ones (a request, command line, checkpoint or adapter the engine refuses) carry one line that names the
problem; the runtime's signals (a cache miss, a lost worker, a failed collective) say what the caller must do."""


class RequestError(ValueError):
    """A generation request with a bad value; the message names the value and what is allowed."""


class UsageError(ValueError):
    """A bad command line (the message is the whole story)."""


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded (names what is wrong)."""


class AdapterError(ValueError):
    """An adapter that cannot be loaded as it is (names the offending keys)."""


class LoraError(AdapterError):
    """A base-model LoRA that cannot be merged whole (names the offending keys)."""


# what a served call's error message starts with when the denoiser lost a request's cache (the loop re-sends)
MISS_PREFIX = "reference cache miss"


class ReferenceCacheMiss(LookupError):
    """No cache under this key (never built, or dropped to stay within the byte bound): the loop answers by
    sending the request's every input again. ``what``: the reference K/V, or the request's kept inputs."""

    def __init__(self, key: str, what: str = "reference K/V"):
        super().__init__(f"{MISS_PREFIX}: no {what} for request {key!r} (dropped or never built)")


class WorkersLost(RuntimeError):
    """A worker died or stopped answering: this denoiser refuses calls until it is restarted."""


class CollectiveError(RuntimeError):
    """A collective failed (a peer died, hung past the timeout, or its connection broke): not one request's
    fault, so callers that answer requests one by one must not retry it per request."""
