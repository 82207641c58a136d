"""Exception types of nucleiscope.

IO and third-party errors are translated into these at the boundary, with the
original exception chained (``raise SlideError(...) from exc``), so that callers
can catch one family and a failures table can record a stable ``error_type``.
"""

from __future__ import annotations


class NucleiscopeError(Exception):
    """Base class of every error nucleiscope raises on purpose."""


class ConfigError(NucleiscopeError, ValueError):
    """A configuration value is invalid (raised by the frozen config dataclasses)."""


class SlideError(NucleiscopeError):
    """A slide cannot be used. ``uri`` names the file, ``reason`` says why in plain words."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason

    def __reduce__(self) -> tuple[type[SlideError], tuple[str, str]]:
        # rebuilt from (uri, reason), so the error survives pickling between processes
        return (type(self), (self.uri, self.reason))


class SlideNotFoundError(SlideError):
    """The slide file or object (or its bucket) does not exist."""


class SlideAccessError(SlideError):
    """The storage refused access to the slide: no, wrong or expired credentials, or no
    permission (HTTP 401/403). Retrying with the same credentials will not help."""


class SlideUnavailableError(SlideError):
    """The slide's storage did not answer properly, even after retries: dropped or refused
    connections, timeouts, HTTP 5xx, throttling. Transient: a later run may succeed."""


class SlideFormatError(SlideError):
    """The file is not a readable whole-slide image (not a TIFF slide, truncated, corrupt)."""


class NotBrightfieldError(SlideError):
    """The slide is not an RGB brightfield (H&E) image, e.g. a fluorescence scan."""


class UnknownResolutionError(SlideError):
    """The slide declares no µm/px and none was given as an override."""


class SlideSizeError(SlideError):
    """The slide's declared size is absurd (zero, negative or beyond any real scanner)."""


class ModelError(NucleiscopeError):
    """Model weights are missing, malformed or do not match the network."""


class OutputError(NucleiscopeError):
    """Results could not be written or committed."""


class DemoDataError(NucleiscopeError):
    """The demo slide could not be fetched or failed its checksum."""
