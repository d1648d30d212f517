"""One exception tree for the whole system; library errors are converted at the boundary."""

from __future__ import annotations


class HarError(Exception):
    """Base of every error this project raises on purpose."""


class PayloadError(HarError):
    """A message on the wire is malformed, too large, of an unknown version or out of range."""


class ConfigError(HarError):
    """Settings are missing, of the wrong type or inconsistent."""


class DataError(HarError):
    """A data set cannot be read (missing file, unreadable archive, checksum mismatch)."""


class ModelError(HarError):
    """A model cannot be built, loaded, run or persisted."""


class ModelInputError(ModelError):
    """Input given to predict or learn has the wrong dtype, shape, values or labels."""


class ModelVerificationError(ModelError):
    """A model payload's hash, signature or contents do not check out: it must not be loaded."""


class BrokerError(HarError):
    """The MQTT broker refused us or cannot be reached."""


class StorageError(HarError):
    """A local database (outbox, trainer store) cannot be opened or written."""
