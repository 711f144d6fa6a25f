"""kombu's SQLAlchemy transport, accepting ``polling_interval`` as a transport option.

kombu's ``sqla`` channel passes every transport option it does not know to
``sqlalchemy.create_engine``, so ``broker_transport_options={"polling_interval": 0.1}`` - the
option every virtual transport reads - crashes the engine creation.  The embedded broker polls
its tables every second by default; that second lands between "job queued" and "job running"
(and again before delivery).  :func:`register` points the ``sqla`` alias at this transport.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy import create_engine

#: Transport options that are not ``create_engine`` arguments (kombu's list plus ours).
_NOT_ENGINE_OPTIONS = (
    "queue_tablename", "message_tablename", "callback", "errback", "max_retries",
    "interval_start", "interval_step", "interval_max", "retry_errors", "polling_interval",
)


class Channel(kombu_sqla.Channel):
    """The kombu SQLAlchemy channel, keeping non-engine options away from ``create_engine``."""

    def _engine_from_config(self) -> Any:
        conninfo = self.connection.client
        options = {k: v for k, v in conninfo.transport_options.items() if k not in _NOT_ENGINE_OPTIONS}
        return create_engine(conninfo.hostname, **options)


class Transport(kombu_sqla.Transport):
    """The kombu SQLAlchemy transport with :class:`Channel`."""

    Channel = Channel


def register() -> None:
    """Make ``sqla+...`` (and ``sqlalchemy+...``) broker URLs use this transport."""
    TRANSPORT_ALIASES["sqla"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["sqlalchemy"] = f"{__name__}:Transport"
