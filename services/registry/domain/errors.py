"""The registry's errors: the shared hierarchy, named for this domain."""

from services.common.errors import (  # noqa: F401  (re-exported for the registry's modules)
    BadRequest,
    BrokerError,
    Conflict,
    Forbidden,
    NotFound,
    Unauthorized,
    Unprocessable,
)


class UnknownModel(Unprocessable):
    title = "unknown accelerator model"


class UnknownRegion(Unprocessable):
    title = "unknown region"
