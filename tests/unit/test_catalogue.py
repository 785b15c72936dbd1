"""The accelerator catalogue: data sanity and name resolution."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import msgspec
import pytest

from services.common.ids import is_valid_id
from services.common.messages import Accelerator
from services.registry.domain.catalogue import (
    DEFAULT_VARIANT, FAMILIES, load_catalogue, normalise_name, normalise_vendor, resolve,
)

REPO_ROOT = Path(__file__).parents[2]

REQUIRED = [
    "nvidia-h100-sxm-80gb", "nvidia-h100-pcie-80gb", "nvidia-h800-sxm-80gb", "nvidia-h20-96gb",
    "nvidia-h200-sxm-141gb", "nvidia-a100-sxm-40gb", "nvidia-a100-sxm-80gb", "nvidia-a800-sxm-80gb",
    "nvidia-l40s", "nvidia-l4", "nvidia-a10", "nvidia-rtx-a6000", "nvidia-rtx-4090", "nvidia-t4",
    "nvidia-v100-sxm2-16gb", "nvidia-v100-sxm2-32gb", "nvidia-p100-pcie-16gb",
    "amd-mi300x", "amd-mi250x", "amd-mi210",
    "huawei-ascend-910b", "huawei-ascend-910c", "huawei-ascend-310p",
    "cambricon-mlu370-x8", "cambricon-mlu590", "hygon-dcu-k100", "kunlunxin-p800", "kunlunxin-r200",
    "intel-gaudi2", "intel-gaudi3",
]


@pytest.fixture(scope="module")
def catalogue() -> dict[str, Accelerator]:
    return load_catalogue()


def _raw_entries() -> list[dict]:
    text = resources.files("services.registry.domain").joinpath("accelerators.json").read_text("utf-8")
    return json.loads(text)


# --- data --------------------------------------------------------------------------------------
def test_size_and_vendor_spread(catalogue: dict[str, Accelerator]) -> None:
    assert len(catalogue) >= 28
    assert len({a.vendor for a in catalogue.values()}) >= 8


def test_json_is_a_strictly_typed_list() -> None:
    data = resources.files("services.registry.domain").joinpath("accelerators.json").read_bytes()
    decoded = msgspec.json.decode(data, type=list[Accelerator])
    assert len(decoded) == len(_raw_entries()) == len(load_catalogue())


def test_required_models_present(catalogue: dict[str, Accelerator]) -> None:
    missing = [m for m in REQUIRED if m not in catalogue]
    assert not missing, missing


def test_model_ids_valid_and_keyed(catalogue: dict[str, Accelerator]) -> None:
    for key, acc in catalogue.items():
        assert key == acc.model
        assert is_valid_id(acc.model), acc.model
        assert acc.model.startswith(acc.vendor + "-"), acc.model


def test_no_duplicate_ids_in_file() -> None:
    ids = [e["model"] for e in _raw_entries()]
    assert len(ids) == len(set(ids))


def test_no_name_or_alias_names_two_models() -> None:
    owner: dict[str, str] = {}
    for e in _raw_entries():
        for label in (e["model"], e["name"], *e.get("aliases", [])):
            key = normalise_name(label)
            assert key, (e["model"], label)
            assert key not in FAMILIES, f"{label!r} of {e['model']} shadows a family name"
            assert owner.setdefault(key, e["model"]) == e["model"], f"{label!r}: {owner[key]} vs {e['model']}"


def test_every_label_resolves_to_its_own_model(catalogue: dict[str, Accelerator]) -> None:
    for acc in catalogue.values():
        for label in (acc.model, acc.name, *acc.aliases):
            found = resolve(label)
            assert found is not None and found.model == acc.model, (label, found and found.model)


def test_every_model_has_sources(catalogue: dict[str, Accelerator]) -> None:
    for acc in catalogue.values():
        assert acc.sources, acc.model
        for url in acc.sources:
            assert url.startswith(("https://", "http://")), (acc.model, url)


def test_fields_positive(catalogue: dict[str, Accelerator]) -> None:
    for acc in catalogue.values():
        assert acc.memory_gib > 0, acc.model
        assert acc.memory_bandwidth_gbs > 0, acc.model
        assert acc.interconnect_gbs > 0, acc.model
        assert acc.interconnect.strip(), acc.model
        assert acc.bf16_tflops >= 0 and acc.fp16_tflops >= 0, acc.model
        assert max(acc.bf16_tflops, acc.fp16_tflops) > 0, acc.model
        assert acc.fp8_tflops is None or acc.fp8_tflops >= max(acc.bf16_tflops, acc.fp16_tflops), acc.model
        assert acc.frameworks and all(f == f.lower() for f in acc.frameworks), acc.model
        assert acc.name.strip(), acc.model


def test_cards_without_bf16_say_zero(catalogue: dict[str, Accelerator]) -> None:
    for model in ("nvidia-t4", "nvidia-v100-sxm2-16gb", "nvidia-v100-sxm2-32gb", "nvidia-p100-pcie-16gb"):
        acc = catalogue[model]
        assert acc.bf16_tflops == 0 and acc.fp16_tflops > 0, model


def test_dense_not_sparse_figures(catalogue: dict[str, Accelerator]) -> None:
    # Vendor headline figures are often 2:4-sparse; the catalogue holds dense ones.
    assert catalogue["nvidia-h100-sxm-80gb"].bf16_tflops == pytest.approx(989.4, rel=0.01)
    assert catalogue["nvidia-h100-sxm-80gb"].fp8_tflops == pytest.approx(1979, rel=0.01)
    assert catalogue["nvidia-a100-sxm-40gb"].bf16_tflops == pytest.approx(312)
    assert catalogue["nvidia-l40s"].bf16_tflops == pytest.approx(362, rel=0.01)
    assert catalogue["amd-mi300x"].bf16_tflops == pytest.approx(1307.4, rel=0.01)


def test_memory_variants_are_separate_models(catalogue: dict[str, Accelerator]) -> None:
    a40, a80 = catalogue["nvidia-a100-sxm-40gb"], catalogue["nvidia-a100-sxm-80gb"]
    assert (a40.memory_gib, a80.memory_gib) == (40, 80)
    assert a40.memory_bandwidth_gbs < a80.memory_bandwidth_gbs
    v16, v32 = catalogue["nvidia-v100-sxm2-16gb"], catalogue["nvidia-v100-sxm2-32gb"]
    assert (v16.memory_gib, v32.memory_gib) == (16, 32)


def test_stacks_match_vendors(catalogue: dict[str, Accelerator]) -> None:
    expected = {"nvidia": "cuda", "amd": "rocm", "huawei": "cann", "cambricon": "neuware", "hygon": "dtk",
                "kunlunxin": "xpu", "intel": "synapseai"}
    for acc in catalogue.values():
        if acc.vendor in expected:
            assert acc.stack == expected[acc.vendor], acc.model


def test_load_catalogue_returns_a_fresh_dict() -> None:
    first = load_catalogue()
    first.pop("nvidia-t4")
    assert "nvidia-t4" in load_catalogue()


def test_families_and_defaults(catalogue: dict[str, Accelerator]) -> None:
    for family, members in FAMILIES.items():
        assert family == normalise_name(family)
        assert all(m in catalogue for m in members), family
        assert DEFAULT_VARIANT[family] == members[0]
    assert DEFAULT_VARIANT["a100"] == "nvidia-a100-sxm-40gb"
    assert DEFAULT_VARIANT["v100"] == "nvidia-v100-sxm2-16gb"


def test_docs_table_lists_every_model(catalogue: dict[str, Accelerator]) -> None:
    doc = (REPO_ROOT / "docs" / "accelerators.md").read_text("utf-8")
    missing = [m for m in catalogue if f"`{m}`" not in doc]
    assert not missing, missing


# --- resolve -----------------------------------------------------------------------------------
def _model(name: str, memory_mib: int | None = None, vendor: str | None = None) -> str | None:
    acc = resolve(name, memory_mib, vendor)
    return acc.model if acc else None


@pytest.mark.parametrize(("name", "memory_mib", "expected"), [
    ("A100", None, "nvidia-a100-sxm-40gb"),
    ("A100", 40960, "nvidia-a100-sxm-40gb"),
    ("A100", 81920, "nvidia-a100-sxm-80gb"),
    ("A100", 80000, "nvidia-a100-sxm-80gb"),
    ("a100", 40536, "nvidia-a100-sxm-40gb"),
    ("A100-80GB", None, "nvidia-a100-sxm-80gb"),
    ("a100-80gb", None, "nvidia-a100-sxm-80gb"),
    ("A100-80GB", 40960, "nvidia-a100-sxm-80gb"),  # an explicit name beats the memory hint
    ("NVIDIA A100 80GB", None, "nvidia-a100-sxm-80gb"),
    ("NVIDIA A100-SXM4-40GB", None, "nvidia-a100-sxm-40gb"),
    ("nvidia a100", None, "nvidia-a100-sxm-40gb"),
    ("A100-40G", None, "nvidia-a100-sxm-40gb"),
    ("A100 80G", None, "nvidia-a100-sxm-80gb"),
    ("V100", None, "nvidia-v100-sxm2-16gb"),
    ("Tesla V100", None, "nvidia-v100-sxm2-16gb"),
    ("Tesla V100", 32768, "nvidia-v100-sxm2-32gb"),
    ("V100", 16160, "nvidia-v100-sxm2-16gb"),
    ("V100-32GB", None, "nvidia-v100-sxm2-32gb"),
    ("V100M32", None, "nvidia-v100-sxm2-32gb"),
    ("V100M16", None, "nvidia-v100-sxm2-16gb"),
    ("v100m16", 32768, "nvidia-v100-sxm2-16gb"),
    ("P100", None, "nvidia-p100-pcie-16gb"),
    ("T4", None, "nvidia-t4"),
    ("Tesla T4", 15360, "nvidia-t4"),
    ("H100", None, "nvidia-h100-sxm-80gb"),
    ("H100 PCIe", None, "nvidia-h100-pcie-80gb"),
    ("H800", None, "nvidia-h800-sxm-80gb"),
    ("H20", None, "nvidia-h20-96gb"),
    ("H200", None, "nvidia-h200-sxm-141gb"),
    ("A10", None, "nvidia-a10"),
    ("A10G", None, "nvidia-a10g"),
    ("A6000", None, "nvidia-rtx-a6000"),
    ("RTX 4090", None, "nvidia-rtx-4090"),
    ("L40S", None, "nvidia-l40s"),
    ("MI300X", None, "amd-mi300x"),
    ("AMD Instinct MI250X", None, "amd-mi250x"),
    ("910B", None, "huawei-ascend-910b"),
    ("Ascend 910B", None, "huawei-ascend-910b"),
    ("Ascend 910B", 32768, "huawei-ascend-910b4"),
    ("huawei-ascend-910b", 32768, "huawei-ascend-910b"),  # a model id is explicit
    ("910B 32GB", None, "huawei-ascend-910b4"),
    ("Ascend910B2", None, "huawei-ascend-910b2"),
    ("910C", None, "huawei-ascend-910c"),
    ("MLU370-X8", None, "cambricon-mlu370-x8"),
    ("mlu590", None, "cambricon-mlu590"),
    ("K100", None, "hygon-dcu-k100"),
    ("P800", None, "kunlunxin-p800"),
    ("Gaudi 2", None, "intel-gaudi2"),
    ("gaudi3", None, "intel-gaudi3"),
    ("  huawei_ascend_910c  ", None, "huawei-ascend-910c"),
])
def test_resolve(name: str, memory_mib: int | None, expected: str) -> None:
    assert _model(name, memory_mib) == expected


@pytest.mark.parametrize("name", [
    "", "   ", "G1", "G2", "G3", "A100 24GB", "T4 48GB", "K40", "L4-SXM", "nvidia", "A1000", "V10", "h100x", "tpu-v9",
])
def test_unknown_names_resolve_to_none(name: str) -> None:
    assert resolve(name) is None


def test_resolve_ignores_case_and_separators() -> None:
    for variant in ("a100-80gb", "A100_80GB", "A100 80 GB", "a100.80gb", "A10080GB"):
        assert _model(variant) == "nvidia-a100-sxm-80gb", variant


def test_vendor_filter() -> None:
    assert _model("A100", vendor="NVIDIA") == "nvidia-a100-sxm-40gb"
    assert resolve("A100", vendor="AMD") is None
    assert resolve("MI300X", vendor="nvidia") is None
    assert _model("Gaudi2", vendor="Habana") == "intel-gaudi2"
    assert _model("A100", vendor="Some Unknown Maker") == "nvidia-a100-sxm-40gb"  # ignored, not a filter
    assert normalise_vendor("Moore Threads") == "moore-threads"
    assert normalise_vendor("nonsense") is None
    assert normalise_vendor(None) is None
