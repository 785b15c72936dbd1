"""Scrape-time gauges of the meter: how far behind the allocation stream it is, and
what it could not apply. (Per-event counters live with the consumer.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Gauge

if TYPE_CHECKING:
    from .service import Meter

LAG = Gauge("cb_meter_lag_events", "Allocation events not yet applied (pending + delivered unacknowledged)")
LAG_STATE = Gauge("cb_meter_lag", "Consumer backlog by state", ["state"])
DEAD_LETTERS = Gauge("cb_meter_dead_letters", "Events in the dead-letter stream (could not be applied)")
LEDGER_BEHIND = Gauge("cb_meter_ledger_behind", "Ledger entries this replica has not loaded yet")


async def refresh(meter: Meter) -> None:
    pending, ack_pending = await meter.consumer.pending()
    LAG.set(pending + ack_pending)
    LAG_STATE.labels("pending").set(pending)
    LAG_STATE.labels("ack_pending").set(ack_pending)
    DEAD_LETTERS.set((await meter.js.stream_info(meter.names.dlq_stream)).state.messages)
    done, target = meter.ledger.progress
    LEDGER_BEHIND.set(max(0, target - done))
