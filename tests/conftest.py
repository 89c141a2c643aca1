"""Fixtures shared by the kernel and model tests."""

import pytest
from m2rec import cpu_scan


def _use_scan_variant(request, monkeypatch):
    width = cpu_scan.VECTOR_WIDTHS[request.param]
    if width > cpu_scan.cpu_vector_width():
        pytest.skip(f"this CPU does not run the {request.param} scan")
    monkeypatch.setattr(cpu_scan, "VECTOR_WIDTH_ALLOWED", width)
    return width


@pytest.fixture(params=["avx512", "avx2", "none"])
def scan_variant(request, monkeypatch):
    """Each variant of the fused CPU scan in turn (its `vector_width`: see cpu_scan.VECTOR_WIDTHS), the narrower ones
    run on a CPU that has a wider one; skipped where the CPU lacks it."""
    return _use_scan_variant(request, monkeypatch)


@pytest.fixture(params=["avx512", "avx2"])
def vectorised_scan_variant(request, monkeypatch):
    """As `scan_variant`, for the channel-vectorised variants only."""
    return _use_scan_variant(request, monkeypatch)
