"""JSON logs: one object per line with ``ts``, ``level``, ``service``, ``msg``,
``request_id``, ``logger``, and whatever context the call passed in ``extra=``.

One line per record so a log shipper (or ``jq``) needs no multi-line parsing; the
request id comes from ``services.common.tracing`` unless the call names one (a
consumer logging a message it took from a batch).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import msgspec

from . import tracing

# attributes every LogRecord has; anything else on a record came from ``extra=``
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName",
                                                                          "color_message"}  # uvicorn's ANSI copy
_encoder = msgspec.json.Encoder(enc_hook=repr)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or tracing.current(),
            "logger": record.name,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(out).decode()


def log_config(service: str, level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for a service process. uvicorn applies it in the
    parent and in every worker process, so its own loggers speak JSON too."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter", "service": service}},
        "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json",
                                "stream": "ext://sys.stdout"}},
        "root": {"handlers": ["stdout"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True, "level": level.upper()}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
