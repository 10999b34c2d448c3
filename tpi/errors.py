"""One exception family for tpi; the CLI turns it into a one-line message and an exit code."""


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


class GroupError(TpiError):
    """The tensor-parallel group cannot run: a device was lost, refused, or misconfigured."""


class BudgetError(TpiError):
    """A memory budget cannot hold what it must."""
