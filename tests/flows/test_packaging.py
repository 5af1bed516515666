"""The installed distribution: one `sand` import namespace that coexists with users' own `models/` code."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # second tier (README: Tests)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    return next(out.glob("sand_rec-*.whl"))


def test_wheel_installs_only_the_sand_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"sand"}
    for module in ("models/sand.py", "pipeline/stages.py", "flows/cli.py", "flows/pipeline_flows.py"):
        assert f"sand/{module}" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "sand = sand.flows.cli:main" in entry_points


def test_wheel_in_fresh_venv_beside_a_users_models_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    # third-party dependencies (torch, ...) come from this environment; its editable `sand` does not
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "research"
    (work / "models").mkdir(parents=True)  # MMRec style: a namespace package, no __init__.py
    (work / "models" / "sand.py").write_text("class SAND:\n    def __init__(self, config, dataset):\n        pass\n")
    code = (
        "import json, models.sand, sand.models.sand, sand.pipeline.base.config, sand.flows.cli; "
        "models.sand.SAND(None, None); "
        "print(json.dumps([models.sand.__file__, sand.models.sand.__file__, sand.flows.cli.__file__]))"
    )
    out = subprocess.run([python, "-c", code], cwd=work, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs, ours, cli = (Path(p) for p in json.loads(out.stdout))
    assert theirs == work / "models" / "sand.py"
    assert ours.is_relative_to(site) and cli.is_relative_to(site)
