"""``cbroker usage`` and ``cbroker invoice`` against a real meter process."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import click
import httpx
from click.testing import CliRunner

from services.cli.billing import register
from services.common.subjects import Subjects

from ..helpers import eventually
from ..procs import service_process
from .test_meter_support import ROLES, ended, granted, issue_keys, lease, provisioning, publish


def cli() -> click.Group:
    group = click.Group()
    register(group)
    return group


async def test_usage_and_invoice_commands(settings, nc, tmp_path) -> None:
    keys = await issue_keys(settings, nc, ROLES)
    demo = {"admin": settings.admin_key, "ops": keys["ops"]["Authorization"][7:],
            "tenants": {"t1": keys["t1"]["Authorization"][7:], "t2": keys["t2"]["Authorization"][7:]}}
    (tmp_path / "demo-keys.json").write_text(json.dumps(demo))
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    period = f"{now.year:04d}-{now.month:02d}"
    a = lease(granted_at=now, expires_at=now + timedelta(days=1), unit_price=Decimal("36"), units=2)
    r = lease(billing="reserved_month", granted_at=now, unit_price=Decimal("1100"), pool_id="p2", region="us-east",
              model="nvidia-h100-sxm-80gb")
    b = lease(tenant="t2", granted_at=now, expires_at=now + timedelta(days=1), unit_price=Decimal("36"))
    failed = lease(granted_at=now, pool_id="p9", provider="flaky", delivery="ssh")
    await publish(nc.jetstream(), Subjects(settings.prefix), granted(a), granted(r), granted(b),
                  ended(a, "released", now + timedelta(seconds=100)), ended(b, "released", now + timedelta(seconds=50)),
                  provisioning(failed), ended(failed, "failed", now + timedelta(seconds=300), reason="no ssh daemon"))
    with service_process("meter", settings, tmp_path) as svc:
        async def billed() -> bool:
            async with httpx.AsyncClient(base_url=svc.url) as http:
                body = (await http.get("/v1/usage", headers=keys["ops"])).json()
                invoice = (await http.get(f"/v1/invoices/{period}", headers=keys["t1"])).json()
                return body.get("totals") == {"USD": "1102.60"} and len(invoice.get("uncharged", [])) == 1

        await eventually(billed, timeout=20)
        base = ["--meter-url", svc.url, "--data-dir", str(tmp_path)]
        runner = CliRunner()

        def run(*args: str) -> str:
            # as piped output reads (wide), whatever COLUMNS the test runner has (xdist's workers: 80)
            result = runner.invoke(cli(), [*args, *base], env={"COLUMNS": "200"})
            assert result.exit_code == 0, result.output
            return result.output

        out = await asyncio.to_thread(run, "usage")  # the first demo tenant: t1
        assert "usage of t1" in out and "1102.00 USD" in out and "2.00 USD" in out and "t2" not in out
        out = await asyncio.to_thread(run, "usage", "--ops", "--group-by", "tenant")
        assert "t1" in out and "t2" in out and "0.60 USD" in out and "total 1102.60 USD" in out
        out = await asyncio.to_thread(run, "usage", "--tenant", "t2", "--csv", "--group-by", "tenant")
        assert out.splitlines() == ["tenant,currency,amount,unit_hours,unit_months,entries",
                                    "t2,USD,0.60,0.016667,0,1"]
        out = await asyncio.to_thread(run, "invoice", period)
        assert f"Invoice t1 {period}" in out and "draft" in out and "1102.00 USD" in out
        assert "reserved_month" in out and "p2" in out and "1 unit-month " in out and "adjustments 0.00" in out
        assert "never became ready" in out and failed.lease_id[:12] in out and "no ssh daemon" in out
        assert "not charged" in out and "flaky" in out
        out = await asyncio.to_thread(run, "invoice")
        assert period in out and "draft" in out
        result = runner.invoke(cli(), ["invoice", "2026-13", *base])
        assert result.exit_code == 1 and "400" in result.output and "YYYY-MM" in result.output
