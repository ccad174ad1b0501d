"""User-facing errors: a request (or command line) the engine refuses, in one line that names the problem."""


class RequestError(ValueError):
    """A generation request with a bad value; the message names the value and what is allowed."""
