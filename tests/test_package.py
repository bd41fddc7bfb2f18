"""Packaging: the model-card template ships inside the wheel, identical to the top-level one."""

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO_ROOT


def test_wheel_contains_the_model_card_template(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO_ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = Path(tmp_path).glob("hf_rmtkd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("hf_rmtkd/templates/model_card_template.md").decode()
    assert shipped == (REPO_ROOT / "model_card_template.md").read_text()
    assert "arXiv:2509.15724" in shipped
