"""Packaging: pyproject declares the torch range the code supports, while the scripts install the tested pins."""

import re

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from tests.support import ROOT


def requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


def test_torch_range_admits_the_gpu_machines_and_the_tested_pin():
    reqs = requirements()
    torch, vision = reqs["torch"].specifier, reqs["torchvision"].specifier
    # 2.11 is what the GPU machines carry, 2.14.1 what the scripts install and the tests run on.
    for v in ("2.11.0", "2.11.1", "2.14.1"):
        assert torch.contains(Version(v)), (v, str(torch))
    for v in ("0.26.0", "0.29.1"):  # torchvision releases paired with torch 2.11 and 2.14
        assert vision.contains(Version(v)), (v, str(vision))
    # a range, not a pin: older than the APIs the code uses (torch.amp.GradScaler, torch.compiler) is refused
    assert not torch.contains(Version("2.2.0")) and not torch.contains(Version("3.0.0"))
    assert not vision.contains(Version("0.17.0"))


def test_scripts_install_the_tested_versions_inside_the_range():
    reqs = requirements()
    for script in ("test.sh", "demo.sh"):
        text = (ROOT / "scripts" / script).read_text()
        pins = dict(re.findall(r"\b(torch|torchvision)==([0-9][0-9.]*)", text))
        assert pins == {"torch": "2.14.1", "torchvision": "0.29.1"}, (script, pins)
        for name, v in pins.items():
            assert reqs[name].specifier.contains(Version(v)), (script, name, v)
