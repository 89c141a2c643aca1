"""The fused CPU kernels' C++ lives in modeling_m2rec/csrc/cpu_scan.cpp; the model folder carries a generated copy,
cpu_scan_source.py (the remote-code loader copies only .py files), which must match it."""

import importlib.util
from pathlib import Path

from m2rec import cpu_scan, cpu_scan_source

REPOSITORY = Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location("embed_cpp_source", REPOSITORY / "scripts" / "embed_cpp_source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_module_is_the_cpp_file(tmp_path, monkeypatch):
    generator = load_generator()
    cpp = (REPOSITORY / "modeling_m2rec" / "csrc" / "cpu_scan.cpp").read_text()
    assert (REPOSITORY / "modeling_m2rec" / "cpu_scan_source.py").read_text() == generator.render(cpp), (
        "modeling_m2rec/cpu_scan_source.py is stale: run python scripts/embed_cpp_source.py")
    assert cpu_scan_source.CPP_SOURCE == cpp and cpu_scan.CPP_SOURCE == cpp
    assert generator.main(["--check"]) == 0
    # An edited .cpp file without a regenerated module fails the check.
    stale = tmp_path / "cpu_scan.cpp"
    stale.write_text(cpp + "// an edit\n")
    monkeypatch.setattr(generator, "CPP_FILE", stale)
    assert generator.main(["--check"]) == 1
