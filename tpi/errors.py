"""One exception family for tpi; the CLI turns it into a one-line message and an exit code."""
from pathlib import Path


def pip_install(extra: str) -> str:
    """The pip command that adds an extra to this tpi. Never `pip install 'tpi[...]'`: the PyPI
    project named tpi is another package, so the command names this checkout (or the README's ./tpi)."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():  # a source checkout (an editable install): its own path
        return f"pip install '{root}[{extra}]'"
    return f"pip install './tpi[{extra}]' (from the folder holding your tpi checkout; PyPI's 'tpi' is another project)"



class TpiError(Exception):
    """A user-facing problem: the message names what went wrong and how to fix it."""

    exit_code = 1


class ModelFormatError(TpiError):
    """The model file is missing, truncated, or uses something tpi does not support."""


class UnsupportedArchitectureError(ModelFormatError):
    """The model's architecture is not one tpi knows."""


class ShapeError(TpiError):
    """A tensor shape cannot go to a kernel or cannot be split as asked."""


class ProtocolError(TpiError):
    """A wire message is malformed, oversized, or from another protocol version."""


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version."""

    def __init__(self, peer_version: object, own_version: int):
        self.peer_version = peer_version
        super().__init__(f"peer speaks protocol version {peer_version!r}, this tpi speaks {own_version}; "
                         "install the same tpi version on every device")


class GroupError(TpiError):
    """The tensor-parallel group cannot run: a device was lost, refused, or misconfigured."""


class NoAnswerError(GroupError):
    """The master did not answer in time (it may be down, or still forming its group)."""


class BudgetError(TpiError):
    """A memory budget cannot hold what it must."""


class ContextOverflowError(TpiError):
    """The prompt does not fit the context."""


class RequestError(TpiError):
    """A request the engine cannot run as given (bad limits, closed service)."""


class QueueFullError(TpiError):
    """Every queue slot is taken; the caller should retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(TpiError):
    """The group is still forming (or failed to): no engine to run on yet (HTTP 503)."""


class GroupUnavailableError(NotReadyError):
    """The group lost a device and cannot run a request until it recovers (HTTP 503)."""
