"""The agent's loop: keep the pools registered and heartbeating, turn each assignment into
running work through its pool's backend, and tell the broker how each one went.

One event loop, three duties (docs/agent.md, "The agent's loop"):

* **liveness** — every pool is registered (``PUT``, idempotent by pool id: retried with
  backoff while the registry is away, never registered twice) and heartbeated in one
  batch per ``heartbeat_s`` with its healthy units; a pool the registry no longer knows
  is registered again;
* **fulfilment** — ``GET /v1/assignments`` every ``poll_s``: a provisioning lease is
  started (devices from the book, the backend's ``start``) and answered ``ready`` with
  the backend's access details, or ``failed`` with the reason; a lease that left the list
  (released, expired, preempted, lost on the broker) has its work stopped and devices
  freed; work that ended by itself (``Backend.poll``) ends its lease: ``complete`` when
  the workload exited, ``health`` unhealthy (→ lost, failover) when it was killed;
* **drain** — on SIGTERM the pools go ``draining``, the work is stopped and each lease
  answered (failed or lost, so the broker fails it over), then the agent exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec

from services.common.delivery import Access

from .api import AgentApi, ApiError, Assigned
from .backends.base import Assignment, Backend, Ended, StartFailed
from .devices import DeviceBook
from .pools import PoolPlan
from .records import LeaseRecord, Records

log = logging.getLogger("agent")

GONE_AFTER = 2  # successive assignment lists without a lease before its work is stopped
ANSWER_TRIES = 8  # a ready/failed/... answer is retried this often while the broker is away


class AgentError(Exception):
    """Something the provider must fix (a pool the registry refuses): one line."""


@dataclass
class _Lease:
    assigned: Assigned
    plan: PoolPlan
    devices: tuple[int, ...] = ()
    state: str = "starting"  # starting → running (ready answered) → over
    task: asyncio.Task | None = None
    absent: int = 0


@dataclass
class Agent:
    api: AgentApi
    plans: list[PoolPlan]
    backends: Mapping[str, Backend]  # by kind: the backends the pools use
    state_dir: Path
    heartbeat_s: float = 10.0
    poll_s: float = 0.5
    grace_s: Mapping[str, float] = field(default_factory=dict)  # by backend kind
    unhealthy: Callable[[], set[int]] = set  # device indices discovery reports unhealthy now
    backoff_max_s: float = 30.0
    leases: dict[str, _Lease] = field(default_factory=dict)
    _deferred: dict[str, Ended] = field(default_factory=dict)  # ended before its ready was answered

    def __post_init__(self) -> None:
        self.pools = {p.pool_id: p for p in self.plans}
        self.book = DeviceBook({p.pool_id: p.devices for p in self.plans if p.backend == "process"})
        self.records = Records(self.state_dir)
        self._drained_file = self.state_dir / "drained.json"
        self.draining = False
        self._unhealthy_now: set[int] = set()

    # --- the whole run ---------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        if not await self._until_done(self.register_all, stop, "registering the pools"):
            return
        beats = asyncio.create_task(self._heartbeats())
        try:
            await self._undrain_own()
            if not await self._until_done(self.recover, stop, "recovering the leases from the broker"):
                return
            while not stop.is_set():
                try:
                    await self.step()
                except Exception:  # noqa: BLE001 - one bad pass must not end the agent (its leases' work runs on)
                    log.exception("fulfilment pass failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_s)
            await self.drain()
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats

    async def _until_done(self, call: Callable[[], Awaitable[None]], stop: asyncio.Event, what: str) -> bool:
        """``call`` until it succeeds, backing off while the services are away (transport
        errors and 5xx); a 4xx is the provider's to fix and ends the agent."""
        delay = 0.5
        while not stop.is_set():
            try:
                await call()
                return True
            except (httpx.TransportError, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status < 500 and exc.status != 429:
                    raise AgentError(f"{what}: {exc}") from None
                log.warning("%s: %s; retrying in %.1f s", what, _said(exc), delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay * random.uniform(0.8, 1.2))
            delay = min(self.backoff_max_s, delay * 2)
        return False

    # --- liveness --------------------------------------------------------------------------
    async def register_all(self) -> None:
        for plan in self.plans:
            await self.register(plan)

    async def register(self, plan: PoolPlan) -> None:
        try:
            view = await self.api.put_pool(plan.pool_id, plan.spec)
        except ApiError as exc:
            if exc.status < 500 and exc.status != 429:
                raise AgentError(f"pool {plan.pool_id}: the registry refused it: {_said(exc)}") from None
            raise
        log.info("pool %s registered (%s, %d units of %s, delivers %s)", plan.pool_id, view.get("status"),
                 plan.spec.units, plan.model, ", ".join(plan.spec.delivery) or "nothing")

    async def heartbeat(self) -> None:
        unhealthy = self.unhealthy()
        self.book.set_unhealthy(unhealthy)
        self._unhealthy_now = unhealthy
        healthy = {p.pool_id: n for p in self.plans if (n := p.healthy_units(unhealthy)) is not None}
        statuses = await self.api.heartbeats(list(self.pools), healthy)
        for pool_id, status in statuses.items():
            if status == "not_found" and pool_id in self.pools:  # removed, or the registry lost it
                log.warning("pool %s is not registered any more; registering it again", pool_id)
                await self.register(self.pools[pool_id])

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self.heartbeat()
            except (httpx.TransportError, ApiError, AgentError) as exc:
                log.warning("heartbeat: %s", _said(exc))
            except Exception:  # noqa: BLE001 - heartbeats must go on, or the pools go offline
                log.exception("heartbeat failed")
            await asyncio.sleep(self.heartbeat_s)

    async def _undrain_own(self) -> None:
        """Pools this agent drained when it last stopped take leases again (a pool the
        provider drained by hand stays drained)."""
        try:
            drained = json.loads(self._drained_file.read_text())
        except (OSError, ValueError):
            return
        for pool_id in drained:
            if pool_id in self.pools:
                with contextlib.suppress(ApiError, httpx.TransportError):
                    await self.api.drain(pool_id, on=False)
        self._drained_file.unlink(missing_ok=True)

    # --- fulfilment ------------------------------------------------------------------------
    async def step(self) -> None:
        """One pass: the broker's assignments against what runs here, then what ended."""
        try:
            listed = await self.api.assignments()
        except (httpx.TransportError, ApiError) as exc:  # the broker is away: change nothing
            log.warning("assignments: %s", _said(exc))
            listed = None
        if listed is not None:
            complete = len(listed) < 1000  # a full page may leave leases out: never infer an end from it
            mine = {a.lease_id: a for a in listed if a.pool_id in self.pools}
            for a in mine.values():
                if a.state == "provisioning" and a.delivery and a.lease_id not in self.leases and not self.draining:
                    if complete:
                        await self._stop_displaced(a, mine)
                    self._take(a)
            for lease_id, lease in list(self.leases.items()):
                if lease_id in mine:
                    lease.absent = 0
                elif complete:
                    lease.absent += 1
                    if lease.absent >= GONE_AFTER:
                        await self.stop_lease(lease_id, "its lease ended on the broker")
        for lease_id, lease in list(self.leases.items()):
            sick = sorted(set(lease.devices) & self._unhealthy_now)
            if sick and lease.state == "running":  # its device failed under it: the lease fails over
                await self.stop_lease(lease_id, f"device {sick[0]} reported unhealthy")
                detail = f"device {', '.join(map(str, sick))} of the lease reported unhealthy by the vendor tool"
                await self._answer(lambda lid=lease_id, d=detail: self.api.unhealthy(lid, d), f"health for {lease_id}")
        for kind, backend in self.backends.items():
            try:
                ended = await backend.poll()
            except Exception:  # noqa: BLE001 - one backend's trouble must not stop the others
                log.exception("%s backend poll failed", kind)
                continue
            for e in ended:
                self._deferred[e.lease_id] = e
        for lease_id, e in list(self._deferred.items()):
            lease = self.leases.get(lease_id)
            if lease is None:
                del self._deferred[lease_id]  # already answered (stopped, failed, drained)
            elif lease.state == "running":
                del self._deferred[lease_id]
                await self.on_ended(lease, e)

    async def _stop_displaced(self, a: Assigned, live: Mapping[str, Assigned]) -> None:
        """The broker named devices for a new lease that a lease still in the book holds:
        that lease is no longer live (the broker never hands out more than a device has),
        so its work stops now rather than after GONE_AFTER passes, and the new lease gets
        exactly the devices it was given."""
        plan = self.pools[a.pool_id]
        if plan.backend != "process" or not a.devices:
            return
        named = [plan.devices[i] for i in a.devices if 0 <= i < len(plan.devices)]
        for holder in sorted(self.book.holders(named) - {a.lease_id}):
            if holder not in live:
                await self.stop_lease(holder, f"the broker gave its device to lease {a.lease_id}")

    def _named_devices(self, a: Assigned, plan: PoolPlan) -> tuple[tuple[int, ...], str | None]:
        """The host devices a lease names (pool index i is the pool's i-th device), taken
        in the book with its share; or why they cannot be."""
        outside = [i for i in a.devices if not 0 <= i < min(len(plan.devices), plan.spec.units)]
        if outside:
            return (), f"pool {plan.pool_id} has no device {outside[0]} (it sells {plan.spec.units})"
        if len(a.devices) != a.units:
            return (), f"{a.units} units leased but {len(a.devices)} devices named"
        devices = tuple(plan.devices[i] for i in a.devices)
        why = self.book.take(a.lease_id, plan.pool_id, devices, a.milli)
        return (devices, None) if why is None else ((), f"pool {plan.pool_id}: {why}")

    def _take(self, a: Assigned) -> None:
        lease = _Lease(assigned=a, plan=self.pools[a.pool_id])
        self.leases[a.lease_id] = lease
        lease.task = asyncio.create_task(self.deliver(lease), name=f"deliver {a.lease_id}")

    async def deliver(self, lease: _Lease) -> None:
        try:
            await self._deliver(lease)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a fault here fails the lease, never leaves it hanging
            log.exception("delivering lease %s", lease.assigned.lease_id)
            if lease.state != "over":
                await self._stop_work(lease)
                await self._give_up(lease, f"the provider's agent could not deliver it ({type(exc).__name__})")

    async def _deliver(self, lease: _Lease) -> None:
        a, plan = lease.assigned, lease.plan
        backend = self.backends.get(plan.backend)
        why = None
        if backend is None:
            why = f"the {plan.backend} backend is not running on this agent"
        elif a.workload is None or a.delivery not in plan.spec.delivery:
            why = f"pool {plan.pool_id} does not deliver {a.delivery or 'nothing'} workloads"
        elif a.milli < 1000 and not a.devices:
            why = f"a share of {a.milli} milli names no device (the broker decides the devices of a share)"
        elif plan.backend == "process" and a.devices:  # the broker's devices, never others
            lease.devices, why = self._named_devices(a, plan)
        elif plan.backend == "process":
            devices = self.book.allocate(a.lease_id, plan.pool_id, a.units)
            if devices is None:
                why = (f"only {len(self.book.free(plan.pool_id))} of pool {plan.pool_id}'s devices are free and "
                       f"healthy; {a.units} leased")
            else:
                lease.devices = devices
        if why is not None or backend is None:
            await self._give_up(lease, why or "")
            return
        record = LeaseRecord(lease_id=a.lease_id, pool_id=plan.pool_id, devices=lease.devices, milli=a.milli)
        self.records.save(record)  # before anything runs: a restart finds it
        try:
            access = await backend.start(Assignment(
                lease_id=a.lease_id, pool_id=plan.pool_id, tenant=a.tenant, units=a.units, devices=lease.devices,
                vendor=plan.vendor, model=plan.model, workload=a.workload, expires_at=a.expires_at,
                milli=a.milli, sharing=plan.spec.sharing.mode, memory_mib=plan.memory_mib))
        except StartFailed as exc:
            await self._give_up(lease, exc.reason)
            return
        except asyncio.CancelledError:
            self._forget(lease)
            raise
        except Exception as exc:  # noqa: BLE001 - a backend bug fails the lease, not the agent
            log.exception("starting lease %s", a.lease_id)
            await backend.stop(a.lease_id, 0)
            await self._give_up(lease, f"the provider's agent could not start it ({type(exc).__name__})")
            return
        if lease.devices:
            access = msgspec.structs.replace(access, devices=list(lease.devices))
        record.access = access
        self.records.save(record)
        await self._answer_ready(lease, access)

    async def _answer_ready(self, lease: _Lease, access: Access) -> None:
        lease_id = lease.assigned.lease_id
        status = await self._answer(lambda: self.api.ready(lease_id, access), f"ready for {lease_id}")
        if status is None:
            lease.state = "running"
            log.info("lease %s ready on pool %s", lease_id, lease.plan.pool_id)
            return
        # 404/409: released, timed out or lost meanwhile; no answer at all: the broker's
        # provision timeout will fail it. Either way its work must not run on.
        log.warning("lease %s: ready not accepted (%s); stopping its work", lease_id, status)
        await self._stop_work(lease)
        self._forget(lease)

    async def _give_up(self, lease: _Lease, reason: str) -> None:
        lease_id = lease.assigned.lease_id
        log.warning("lease %s failed: %s", lease_id, reason)
        self._forget(lease)
        await self._answer(lambda: self.api.failed(lease_id, reason), f"failed for {lease_id}")

    async def _answer(self, call: Callable[[], Awaitable[None]], what: str) -> int | str | None:
        """None when the broker took the answer; its 4xx status when it refused it; "away"
        when it did not answer through every retry."""
        delay = 0.5
        for _ in range(ANSWER_TRIES):
            try:
                await call()
                return None
            except ApiError as exc:
                if exc.status < 500 and exc.status != 429:
                    log.info("%s: %s", what, _said(exc))
                    return exc.status
                log.warning("%s: %s; retrying", what, _said(exc))
            except httpx.TransportError as exc:
                log.warning("%s: %s; retrying", what, _said(exc))
            await asyncio.sleep(delay)
            delay = min(self.backoff_max_s, delay * 2)
        return "away"

    async def on_ended(self, lease: _Lease, e: Ended) -> None:
        """Work that ended by itself: its exit ends the lease (released, billing stops);
        work the system killed makes the lease lost (the broker fails it over)."""
        lease_id = lease.assigned.lease_id
        self._forget(lease)
        if e.state == "exited":
            log.info("lease %s: workload exited (%s)", lease_id, e.reason or e.exit_code)
            status = await self._answer(lambda: self.api.complete(lease_id, e.exit_code), f"complete for {lease_id}")
        else:
            log.warning("lease %s: workload lost: %s", lease_id, e.reason)
            status = await self._answer(lambda: self.api.unhealthy(lease_id, e.reason or "the workload was lost"),
                                        f"health for {lease_id}")
        if status == 409:  # still provisioning on the broker (its ready never got through)
            reason = f"the workload ended before it was ready: {e.reason or e.state}"
            await self._answer(lambda: self.api.failed(lease_id, reason), f"failed for {lease_id}")

    async def stop_lease(self, lease_id: str, why: str) -> None:
        """The broker ended the lease: its work stops and its devices come back."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return
        log.info("lease %s: %s; stopping its work", lease_id, why)
        if lease.task is not None and not lease.task.done():
            lease.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease.task
        await self._stop_work(lease)
        self._forget(lease)

    async def _stop_work(self, lease: _Lease) -> None:
        backend = self.backends.get(lease.plan.backend)
        if backend is not None:
            try:
                await backend.stop(lease.assigned.lease_id, self.grace_s.get(lease.plan.backend, 10.0))
            except Exception:  # noqa: BLE001 - logged; the record stays for the next start to retry
                log.exception("stopping lease %s", lease.assigned.lease_id)
                return

    def _forget(self, lease: _Lease) -> None:
        lease_id = lease.assigned.lease_id
        lease.state = "over"
        self.leases.pop(lease_id, None)
        self.book.release(lease_id)
        self.records.delete(lease_id)

    # --- restart ---------------------------------------------------------------------------
    async def recover(self) -> None:
        """After a restart: the broker says which leases are live, the backends which work
        still runs, the records which devices each held. Live and running: adopted (and
        answered ready if the broker still waits for it). Live but its work gone: lost (or
        completed, when the backend saw it exit). Running but no longer live: stopped.
        Nothing without a record is touched."""
        listed = await self.api.assignments()
        live = {a.lease_id: a for a in listed if a.pool_id in self.pools}
        running: set[str] = set()
        ended: dict[str, Ended] = {}
        for backend in self.backends.values():
            running |= set(await backend.recover())
            ended |= {e.lease_id: e for e in await backend.poll()}
        recorded = {r.lease_id: r for r in self.records.all()}
        for lease_id, record in recorded.items():
            plan = self.pools.get(record.pool_id)
            a = live.get(lease_id)
            if plan is None or a is None:
                if plan is not None and lease_id in running:
                    log.info("lease %s ended while the agent was down; stopping its work", lease_id)
                    await self.backends[plan.backend].stop(lease_id, self.grace_s.get(plan.backend, 10.0))
                self.records.delete(lease_id)
                continue
            lease = _Lease(assigned=a, plan=plan, devices=tuple(record.devices))
            self.leases[lease_id] = lease
            if lease_id in running:
                if plan.backend == "process":
                    self.book.restore(plan.pool_id, {lease_id: record.devices}, [lease_id],
                                      milli={lease_id: record.milli})
                log.info("lease %s: its work still runs; adopted", lease_id)
                if a.state == "provisioning":
                    await self._answer_ready(lease, record.access or Access(devices=list(record.devices)))
                else:
                    lease.state = "running"
                continue
            lease.state = "running"
            await self.on_ended(lease, ended.get(lease_id) or Ended(
                lease_id=lease_id, state="lost", reason="its work is gone (the provider's agent restarted)"))
        for lease_id, a in live.items():
            if a.state == "ready" and a.delivery and lease_id not in self.leases:
                reason = "the provider's agent has no record of this lease's work"
                await self._answer(lambda lid=lease_id: self.api.unhealthy(lid, reason), f"health for {lease_id}")

    # --- shutdown --------------------------------------------------------------------------
    async def drain(self) -> None:
        """SIGTERM: take nothing new, stop every workload, answer each lease (a stopped
        workload is a lost lease for the broker, which fails it over)."""
        self.draining = True
        drained = []
        for pool_id in self.pools:
            try:
                await self.api.drain(pool_id, on=True)
                drained.append(pool_id)
            except (ApiError, httpx.TransportError) as exc:
                log.warning("draining pool %s: %s", pool_id, _said(exc))
        self._drained_file.write_text(json.dumps(drained))
        for lease_id, lease in list(self.leases.items()):
            was_running = lease.state == "running"
            await self.stop_lease(lease_id, "the agent is shutting down")
            if was_running:
                detail = "the provider's agent shut down and stopped the workload"
                status = await self._answer(lambda lid=lease_id: self.api.unhealthy(lid, detail),
                                            f"health for {lease_id}")
            else:
                status = 409
            if status == 409:
                await self._answer(lambda lid=lease_id: self.api.failed(lid, "the provider's agent shut down"),
                                   f"failed for {lease_id}")
        for backend in self.backends.values():
            with contextlib.suppress(Exception):
                await backend.close()
        log.info("drained: %d pools draining, every workload stopped", len(drained))


def _said(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
