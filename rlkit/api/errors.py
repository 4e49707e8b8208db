"""Errors rlkit raises on purpose, so callers can tell them from bugs."""


class RlkitError(Exception):
    """Base class for errors about the caller's input or setup."""


class ModelNotFoundError(RlkitError, OSError):
    """`base_model` is neither a built-in, a local directory, nor a loadable hub id."""


class InvalidDatumError(RlkitError, ValueError):
    """A Datum's tokens or loss inputs are malformed; the message names datum and field."""


class UnknownLossError(RlkitError, KeyError):
    """A loss name that is not in the registry; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class NoGradientsError(RlkitError, RuntimeError):
    """optim_step was called with no forward_backward since the last step."""


class PeerLostError(RlkitError):
    """A step shared between processes failed: another process died, hung past the timeout,
    or left early."""
