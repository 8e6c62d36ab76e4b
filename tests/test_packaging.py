"""Packaging metadata as the Python packaging guide recommends (CI also builds the wheel
and the sdist, installs the wheel into a fresh environment and imports it: .ci/run)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if sys.version_info < (3, 11):
    pytest.skip("tomllib needs Python 3.11", allow_module_level=True)
import tomllib  # noqa: E402


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_license_is_an_spdx_string_with_its_file():
    meta = pyproject()
    assert meta["project"]["license"] == "Apache-2.0"
    assert meta["project"]["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    # PEP 639: a license classifier next to an SPDX expression is an error.
    assert not any(c.startswith("License ::") for c in meta["project"]["classifiers"])
    assert "setuptools>=77" in meta["build-system"]["requires"]  # SPDX strings need 77


def test_cli_dependencies_are_an_extra():
    project = pyproject()["project"]
    required = " ".join(project["dependencies"])
    assert "matplotlib" not in required and "tqdm" not in required
    extras = project["optional-dependencies"]
    assert {d.split(">")[0] for d in extras["cli"]} == {"matplotlib", "tqdm"}
    assert "slimoptim[cli]" in extras["test"]  # the README's install line tests the plot
    # No public repository address exists yet: no invented project URLs.
    assert "urls" not in project
    assert any(
        c.startswith("Programming Language :: Python :: 3.1") for c in project["classifiers"]
    )


def test_sdist_carries_the_examples_its_tests_run():
    manifest = (REPO / "MANIFEST.in").read_text().splitlines()
    assert "graft examples" in manifest
