"""The conformance suite: every family x every path is exact against its hand-made reference or
refused with an error that names the feature and the way out; never silently different.

A cell's outcome must equal :mod:`tests.conformance.expected`, from which the README's support
table is rendered (``test_readme_table``). FATReLU cells: two correct implementations may round
a gate within float error of t to different sides; such a cell fails with ``ThresholdFlip`` and
the count of near-threshold gates, never with a silent pass (none occur with these inputs).
"""

from __future__ import annotations

import pathlib
import traceback

import pytest
import torch

from tests.conformance import cells
from tests.conformance.expected import (
    DRELU_PATHS,
    PATHS,
    REASONS,
    SETUP_CELLS,
    expected,
    render_table,
)
from tests.conformance.families import FAMILIES

# the training setups run on these families in the default run, on all with
# PROSPARSE_CONFORMANCE=full (see conftest.py)
SETUP_FAMILIES = ("llama", "phi3", "gpt2", "bert", "mixtral")


def _run(family: str, cell: str, tmp_path: pathlib.Path) -> float:
    path, _, setup = cell.partition(":")
    if path == "onnx":
        return cells.onnx_export(family, str(tmp_path))
    if path == "drelu_onnx":
        return cells.onnx_export(family, str(tmp_path), "drelu")
    if path in cells.TRAINING:
        return cells.TRAINING[path](family, setup or "plain")
    return cells.INFERENCE[path](family)


def _raised_by_library(exc: BaseException) -> bool:
    """The refusal comes from prosparse_fx itself (not a crash deep in torch)."""
    while exc.__cause__ is not None and not isinstance(exc, (ValueError, NotImplementedError)):
        exc = exc.__cause__
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and "prosparse_fx" in frames[-1].filename


def check_cell(family: str, cell: str, tmp_path: pathlib.Path) -> None:
    reason = expected(family, cell)
    if reason is None:
        err = _run(family, cell, tmp_path)
        assert err <= cells.TOL[torch.bfloat16 if "bf16" in cell else torch.float32]
        return
    words = REASONS[reason][0]
    with pytest.raises(Exception) as info:  # noqa: PT011 - the message is checked below
        _run(family, cell, tmp_path)
    assert not isinstance(info.value, AssertionError), f"expected a refusal, got {info.value}"
    assert words in str(info.value), f"refusal without {words!r}: {info.value}"
    assert _raised_by_library(info.value), f"not refused by prosparse_fx: {info.value!r}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cell", PATHS)
def test_path(family: str, cell: str, tmp_path: pathlib.Path) -> None:
    check_cell(family, cell, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cell", DRELU_PATHS)
def test_drelu_path(family: str, cell: str, tmp_path: pathlib.Path) -> None:
    check_cell(family, cell, tmp_path)


_FULL = pytest.mark.conformance_full


@pytest.mark.parametrize(
    "family", [f if f in SETUP_FAMILIES else pytest.param(f, marks=_FULL) for f in FAMILIES]
)
@pytest.mark.parametrize("cell", SETUP_CELLS)
def test_training_setup(family: str, cell: str, tmp_path: pathlib.Path) -> None:
    check_cell(family, cell, tmp_path)


def test_readme_table() -> None:
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    begin, end = "<!-- conformance table: begin -->", "<!-- conformance table: end -->"
    assert begin in readme and end in readme, "README.md lacks the conformance table markers"
    table = readme.split(begin)[1].split(end)[0].strip()
    assert table == render_table().strip(), (
        "README's support table differs from tests/conformance/expected.py; paste the output of "
        "`python -m tests.conformance` between the markers"
    )
