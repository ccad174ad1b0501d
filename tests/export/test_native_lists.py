"""The lists the native code repeats (the dispatch header's enums and parsers, CMake's defaults) are the Python
declarations: masks from ``kernels.joint_attention`` (ids = their index), dtypes and head dims from
``export.aot_build``. The header cannot import Python, so this test reads it."""
from __future__ import annotations

import re
from pathlib import Path

from export.aot_build import DTYPES, HEAD_DIMS
from kernels import EXPORTED_MASKS, MASK_IDS, MASK_MODES

ROOT = Path(__file__).resolve().parents[2]
HEADER = (ROOT / "native" / "joint_attention_dispatch.h").read_text()
CMAKE = (ROOT / "CMakeLists.txt").read_text()


def _enum(name: str) -> dict[str, int]:
    """``enum class <name> { kFooBar = 3, ... }`` -> {"foobar": 3}."""
    body = re.search(r"enum class " + name + r"\s*:\s*\w+\s*\{(.*?)\};", HEADER, re.S)
    assert body, f"no enum {name} in the header"
    return {m[1].lower(): int(m[2]) for m in re.finditer(r"k(\w+)\s*=\s*(\d+)", body[1])}


def _cmake_default(variable: str) -> list[str]:
    found = re.search(r'set\(' + variable + r'\s+"([^"]*)"', CMAKE)
    assert found, f"no default for {variable} in CMakeLists.txt"
    return found[1].split(";")


def test_mask_ids_are_the_index_of_each_mask():
    assert MASK_MODES[:len(EXPORTED_MASKS)] == EXPORTED_MASKS
    assert MASK_IDS == {mask: i for i, mask in enumerate(MASK_MODES)}


def test_the_header_masks_are_the_exported_masks_with_their_kernel_ids():
    assert _enum("Mask") == {mask: MASK_IDS[mask] for mask in EXPORTED_MASKS}
    parsed = re.findall(r'text == "(\w+)"', HEADER.split("parseMask", 1)[1].split("}\n}", 1)[0])
    assert parsed == list(EXPORTED_MASKS)
    assert all(f"kMask_{mask}" in HEADER for mask in EXPORTED_MASKS)


def test_the_header_dtypes_are_the_aot_build_dtypes_in_order():
    assert _enum("Dtype") == {name: i for i, name in enumerate(DTYPES)}


def test_cmake_defaults_come_from_the_declared_lists():
    assert _cmake_default("MVGEN_AOT_MASKS") == list(EXPORTED_MASKS)
    assert set(_cmake_default("MVGEN_AOT_DTYPES")) <= set(DTYPES)
    assert [int(d) for d in _cmake_default("MVGEN_AOT_HEAD_DIMS")] == list(HEAD_DIMS)
