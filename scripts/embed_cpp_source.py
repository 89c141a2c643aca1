"""Writes modeling_m2rec/cpu_scan_source.py, the copy of modeling_m2rec/csrc/cpu_scan.cpp as a Python string.

transformers' remote-code loader copies only the `.py` files of the model folder next to a checkpoint, so the C++ of
the fused CPU kernels travels in a generated module; the `.cpp` file is the one to edit. Run after every edit:

    python scripts/embed_cpp_source.py           # rewrite the module
    python scripts/embed_cpp_source.py --check   # exit 1 where the module is stale (tests/test_cpp_source.py)
"""

import argparse
import sys
from pathlib import Path

MODEL_FOLDER = Path(__file__).resolve().parents[1] / "modeling_m2rec"
CPP_FILE = MODEL_FOLDER / "csrc" / "cpu_scan.cpp"
MODULE_FILE = MODEL_FOLDER / "cpu_scan_source.py"


def render(cpp_source: str) -> str:
    """The generated module's text for `cpp_source`: a raw string, so the C++ reads as it is in the .cpp file."""
    if '"""' in cpp_source or cpp_source.endswith("\\"):
        raise ValueError(f"{CPP_FILE} cannot be embedded in a raw triple-quoted string (it holds '\"\"\"' or ends "
                         f"with a backslash)")
    return (f'"""The C++ source of the fused CPU kernels, generated from csrc/cpu_scan.cpp by '
            f'scripts/embed_cpp_source.py: do not\nedit; edit the .cpp file and rerun the script. (transformers\' '
            f'remote-code loader copies only .py files.)"""\n\nCPP_SOURCE = r"""{cpp_source}"""\n')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the module is up to date")
    args = parser.parse_args(argv)
    expected = render(CPP_FILE.read_text())
    if args.check:
        if not MODULE_FILE.exists() or MODULE_FILE.read_text() != expected:
            print(f"{MODULE_FILE} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    MODULE_FILE.write_text(expected)
    print(f"wrote {MODULE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
