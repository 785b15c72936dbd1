"""Discovery parsers on outputs captured from real machines (tests/data/agent/README.md
names each source): exact device lists, health, and the catalogue mapping, including
the devices it must refuse to guess."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from services.agent import discovery
from services.agent.discovery import Catalogue, Device, Inventory, amd, ascend, discover, from_static, nvidia

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "agent"
CATALOGUE = Catalogue(json.loads((ROOT / "services" / "registry" / "domain" / "accelerators.json").read_text()))


def read(name: str) -> str:
    return (DATA / name).read_text()


def summary(devices):
    return [(d.index, d.name, d.bus_id, d.memory_mib, d.healthy) for d in devices]


@pytest.mark.parametrize(("name", "expected", "model"), [
    ("nvidia-smi-query-gpu-csv_nvidia-h100-80gb-hbm3__590.48.01.csv",
     (0, "NVIDIA H100 80GB HBM3", "0000:00:09.0", 81559, True), "nvidia-h100-sxm-80gb"),
    ("nvidia-smi-query-gpu-csv_nvidia-h200__590.48.01.csv",
     (0, "NVIDIA H200", "0000:83:00.0", 143771, True), "nvidia-h200-sxm-141gb"),
    ("nvidia-smi-query-gpu-csv_nvidia-l40s__595.80.csv",
     (0, "NVIDIA L40S", "0000:01:00.0", 46068, True), "nvidia-l40s"),
])
def test_nvidia_csv_with_header(name, expected, model):
    devices = nvidia.parse_query_csv(read(name))
    assert summary(devices) == [expected]
    assert [CATALOGUE.map(d).model for d in devices] == [model]


def test_nvidia_csv_noheader_nounits_uses_the_query_fields():
    fields = ("power.limit", "power.min_limit", "power.max_limit", "memory.total", "vbios_version", "driver_version",
              "name", "gpu_uuid", "power.draw", "temperature.gpu", "temperature.memory", "clocks.current.graphics",
              "clocks.sm", "clocks.mem", "utilization.gpu", "utilization.memory", "fan.speed",
              "pcie.link.width.current", "pstate")
    [device] = nvidia.parse_query_csv(read("nvidia-smi-query-gpu-noheader-nounits_gpu-utils-issue-83_rtx2080.csv"), fields)
    assert (device.index, device.name, device.uuid, device.memory_mib, device.healthy) == (
        0, "GeForce RTX 2080", "GPU-22b2c6ac-2d49-4863-197c-9c469071178a", 7979, True)
    mapped = CATALOGUE.map(device)  # a consumer card: not in the catalogue, and said so
    assert mapped.model == "" and "'GeForce RTX 2080'" in mapped.unmapped
    with pytest.raises(ValueError, match="19 columns, expected 7"):
        nvidia.parse_query_csv(read("nvidia-smi-query-gpu-noheader-nounits_gpu-utils-issue-83_rtx2080.csv"))


@pytest.mark.parametrize(("name", "expected", "model"), [
    ("nvidia-smi-q-x_telegraf_a100-sxm4-v12.xml",
     (0, "NVIDIA A100-SXM4-80GB", "0000:01:00.0", 81920, True), "nvidia-a100-sxm-80gb"),
    ("nvidia-smi-q-x_telegraf_a10g.xml", (0, "NVIDIA A10G", "0000:00:1e.0", 23028, True), "nvidia-a10g"),
    ("nvidia-smi-q-x_telegraf_tesla-t4.xml", (0, "Tesla T4", "0000:00:1e.0", 15360, True), "nvidia-t4"),
])
def test_nvidia_xml(name, expected, model):
    devices = nvidia.parse_query_xml(read(name))
    assert summary(devices) == [expected]
    assert [CATALOGUE.map(d).model for d in devices] == [model]


def test_xid_79_marks_the_gpu_on_that_bus_unhealthy():
    log = read("kernel-log-xid_gpu-burn-issue-1.txt")
    assert nvidia.parse_xids(log) == [("0000:02:00", 79, "Xid (PCI:0000:02:00): 79, GPU has fallen off the bus.")]
    [t4] = nvidia.parse_query_xml(read("nvidia-smi-q-x_telegraf_tesla-t4.xml"))
    on_that_bus = msgspec.structs.replace(t4, bus_id="0000:02:00.0")
    after = nvidia.apply_xids([t4, on_that_bus], log)
    assert [d.healthy for d in after] == [True, False]  # the Xid names 0000:02:00, not the T4's 0000:00:1e
    assert after[1].problems == ("Xid (PCI:0000:02:00): 79, GPU has fallen off the bus.",)


def test_rocm_smi_mi250x_maps_through_its_pci_device_id():
    [device] = amd.parse_rocm_smi_json(read("rocm-smi-json_rocm_smi_lib-issue-159_mi250x.json"))
    assert (device.vendor, device.index, device.name, device.device_id) == (
        "amd", 0, "AMD INSTINCT MI200 (MCM) OAM LC MBA HPE C2", "0x7408")
    assert CATALOGUE.map(device).model == "amd-mi250x"


def test_rocm_smi_consumer_card_and_redacted_hygon_stay_unmapped():
    [radeon] = amd.parse_rocm_smi_json(read("rocm-smi-json_gpustack_rx7800xt.json"))
    assert (radeon.vendor, radeon.index, radeon.name, radeon.memory_mib, radeon.uuid) == (
        "amd", 0, "Navi 32 [Radeon RX 7700 XT / 7800 XT]", 17163091968 // 2**20, "0x5c88007d760374f3")
    [dcu] = amd.parse_rocm_smi_json(read("rocm-smi-json_gpustack_hygon-dcu.json"))
    assert (dcu.vendor, dcu.index, dcu.name, dcu.memory_mib) == ("hygon", 0, "DCU xxxx", 65520)
    for device in (radeon, dcu):
        mapped = CATALOGUE.map(device)
        assert mapped.model == "" and "no catalogue model has this name" in mapped.unmapped
    # the provider names it instead
    assert CATALOGUE.map(dcu, {"DCU xxxx": "hygon-dcu-k100"}).model == "hygon-dcu-k100"


def test_npu_smi_warning_health_is_unhealthy():
    devices = ascend.parse_npu_smi_info(read("npu-smi-info_atlas-800-9010_24.1.RC2.txt"))
    assert [(d.index, d.bus_id, d.memory_mib) for d in devices] == [
        (0, "0000:c1:00.0", 32768), (1, "0000:81:00.0", 32768), (2, "0000:41:00.0", 32768),
        (3, "0000:01:00.0", 32768), (4, "0000:c2:00.0", 32768), (5, "0000:82:00.0", 32768),
        (6, "0000:42:00.0", 32768), (7, "0000:02:00.0", 32768)]
    assert [d.index for d in devices if not d.healthy] == [3, 7]
    assert devices[3].problems == ("npu-smi health Warning",)
    # the manual redacted the model ("xxx"): never guessed
    assert {CATALOGUE.map(d).model for d in devices} == {""}


def test_npu_smi_910a_is_not_mistaken_for_a_910b():
    devices = ascend.parse_npu_smi_info(read("npu-smi-info_atlas-800-9010_22.0.3.1.txt"))
    assert [(d.index, d.name, d.healthy) for d in devices] == [(i, "910A", True) for i in range(8)]
    assert all("'910A': no catalogue model" in CATALOGUE.map(d).unmapped for d in devices)


def test_npu_smi_multi_chip_board_uses_logical_ids():
    devices = ascend.parse_npu_smi_info(read("npu-smi-info_atlas-800-3000_21.0.4.txt"))
    assert [(d.index, d.name, d.bus_id, d.memory_mib) for d in devices] == [
        (3, "310", "0000:89:00.0", 8192), (4, "310", "0000:8a:00.0", 8192),
        (5, "310", "0000:8b:00.0", 8192), (6, "310", "0000:8c:00.0", 8192)]


def test_static_inventory_reports_unknown_models():
    inventory = from_static([{"model": "nvidia-h100-sxm-80gb", "indices": [0, 1]},
                             {"model": "h100", "indices": [2]}], CATALOGUE)
    assert [(d.index, d.model) for d in inventory.devices] == [(0, "nvidia-h100-sxm-80gb"), (1, "nvidia-h100-sxm-80gb"), (2, "")]
    assert [d.unmapped for d in inventory.unmapped] == ["unknown model 'h100'"]
    assert {m: [d.index for d in ds] for m, ds in inventory.by_model().items()} == {"nvidia-h100-sxm-80gb": [0, 1]}


def test_a_name_two_models_share_is_decided_by_memory_or_refused():
    # "A100-SXM4" alone would be ambiguous; the full name with 80GB is one model
    [a100] = nvidia.parse_query_xml(read("nvidia-smi-q-x_telegraf_a100-sxm4-v12.xml"))
    assert CATALOGUE.map(a100).model == "nvidia-a100-sxm-80gb"
    fake_catalogue = Catalogue([
        {"model": "x-40", "vendor": "nvidia", "name": "X", "aliases": [], "memory_gib": 40},
        {"model": "x-80", "vendor": "nvidia", "name": "X", "aliases": [], "memory_gib": 80}])
    as_x = Device(vendor="nvidia", index=0, name="X", source="test", memory_mib=81920)
    assert fake_catalogue.map(as_x).model == "x-80"
    unknown_memory = Device(vendor="nvidia", index=0, name="X", source="test")
    assert "matches several models (x-40, x-80)" in fake_catalogue.map(unknown_memory).unmapped


def stand_in(folder: Path, tool: str, script: str) -> None:
    """An executable named like a vendor tool that replays a captured output: it tests
    how discovery runs tools (PATH lookup, exit codes, timeouts), not any hardware."""
    path = folder / tool
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


async def test_discover_runs_the_tools_on_path_and_reports_a_failing_one(tmp_path):
    stand_in(tmp_path, "nvidia-smi", f"cat '{DATA / 'nvidia-smi-query-gpu-csv_nvidia-h100-80gb-hbm3__590.48.01.csv'}'")
    stand_in(tmp_path, "npu-smi", f"cat '{DATA / 'npu-smi-info_atlas-800-9010_24.1.RC2.txt'}'")
    stand_in(tmp_path, "rocm-smi", "echo 'ERROR: GPU[0] : Unable to open /dev/kfd' >&2; exit 2")
    stand_in(tmp_path, "dmesg", f"cat '{DATA / 'kernel-log-xid_gpu-burn-issue-1.txt'}'")
    inventory = await discover(CATALOGUE, {"xxx": "huawei-ascend-910b"}, path=str(tmp_path))
    assert [(d.vendor, d.index, d.model, d.healthy) for d in inventory.devices] == [
        ("nvidia", 0, "nvidia-h100-sxm-80gb", True),  # the Xid is for another bus
        *[("huawei", i, "huawei-ascend-910b", i not in (3, 7)) for i in range(8)]]
    assert inventory.errors == ("rocm-smi: rocm-smi exited 2: ERROR: GPU[0] : Unable to open /dev/kfd",)
    assert inventory.healthy_units("huawei-ascend-910b") == 6
    assert inventory.healthy_units("nvidia-h100-sxm-80gb") == 1


async def test_discover_gives_up_on_a_tool_that_hangs(tmp_path, monkeypatch):
    monkeypatch.setattr(discovery, "TOOL_TIMEOUT_S", 0.3)
    stand_in(tmp_path, "npu-smi", "exec sleep 30")
    inventory = await discover(CATALOGUE, path=str(tmp_path))
    assert inventory.devices == ()
    assert inventory.errors == ("npu-smi: npu-smi did not answer within 0.3 s",)


async def test_discover_with_no_vendor_tool_finds_nothing(tmp_path):
    assert await discover(CATALOGUE, path=str(tmp_path)) == Inventory()
