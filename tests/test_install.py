"""The distribution installs under one namespace, ``glmwb``, and shadows nothing.

Hugging Face's ``kernels`` distribution (which transformers >= 5.25 imports when any model module loads)
and our ``kernels/`` folder share a name: ours must be ``glmwb.kernels`` everywhere — from the repository
root, from an editable install, and from a wheel installed into a virtual environment outside the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "pretrain", "annotation", "rewards", "align", "ui", "recipes")


def subpackages() -> list[str]:
    """Every folder of ours that holds Python files, as its module name under glmwb."""
    names = set()
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                names.add("glmwb." + ".".join(path.relative_to(ROOT).parent.parts))
    return sorted(names)


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


# Imports every subpackage, Hugging Face's kernels and transformers' GLM, and says where kernels came from.
_PROBE = """
import importlib, json, sys
names = json.loads(sys.argv[1])
for name in names:
    importlib.import_module(name)
import kernels, transformers.models.glm.modeling_glm
import glmwb.kernels.apply, glmwb.recipes.cli
print(json.dumps({"kernels": kernels.__file__, "cuda_properties": hasattr(kernels, "CUDAProperties"),
                  "glmwb_kernels": list(glmwb.kernels.__path__)}))
"""


def test_every_folder_is_a_listed_package():
    """pyproject.toml lists the packages explicitly (package-dir maps glmwb to the root): none forgotten."""
    text = (ROOT / "pyproject.toml").read_text()
    missing = [name for name in subpackages() if f'"{name}"' not in text]
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_no_top_level_folder_is_a_regular_package():
    """A folder at the root with __init__.py would be importable as a top-level module from the root and
    shadow another distribution of that name (Hugging Face's `kernels`)."""
    assert [f for f in FOLDERS if (ROOT / f / "__init__.py").exists()] == []


def test_from_the_repository_root_kernels_is_hugging_faces():
    import json

    proc = _run([sys.executable, "-c", _PROBE, json.dumps(subpackages())], cwd=ROOT)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not seen["kernels"].startswith(str(ROOT / "kernels")), seen
    assert seen["cuda_properties"], "transformers needs Hugging Face's kernels (CUDAProperties)"
    assert str(ROOT / "kernels") in seen["glmwb_kernels"], seen  # the editable install maps the folder
    help_text = _run([sys.executable, "-m", "glmwb.recipes.cli", "--help"], cwd=ROOT).stdout
    assert "run" in help_text and "validate" in help_text


def test_the_wheel_installs_only_glmwb_and_works_outside_the_checkout(tmp_path):
    """Build the wheel, install it (no dependencies, offline) into a fresh virtual environment that reuses
    this one's packages, and from a folder outside the checkout import everything and run `glmwb --help`."""
    import json

    wheels = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
          str(ROOT)], cwd=tmp_path)  # fmt: skip
    (wheel,) = wheels.glob("glm_workbench-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert top == {"glmwb"}, f"the wheel installs top-level names besides glmwb: {sorted(top - {'glmwb'})}"
    assert "glmwb/recipes/quickstart.yaml" in names
    assert "glmwb/annotation/migrations/alembic.ini" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    vpy = venv / "bin" / "python"
    # Offline: the new environment sees this one's installed dependencies through a .pth file (appended,
    # so its own site-packages, where the wheel goes, comes first); only the wheel itself is installed.
    vsite = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      cwd=tmp_path).stdout.strip())  # fmt: skip
    # (every site-packages folder this interpreter sees: a venv may itself reach its packages through a .pth)
    reuse = [sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("site-packages"))]
    (vsite / "zz_reuse_deps.pth").write_text("\n".join(dict.fromkeys(reuse)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONSTRAINT")}
    _run(
        [str(vpy), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path, env=env
    )

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    proc = _run([str(vpy), "-c", _PROBE, json.dumps(subpackages())], cwd=outside, env=env)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["cuda_properties"] and not seen["kernels"].startswith(str(ROOT / "kernels")), seen
    assert all(str(vsite) in p for p in seen["glmwb_kernels"]), f"glmwb came from elsewhere: {seen}"
    out = _run([str(venv / "bin" / "glmwb"), "--help"], cwd=outside, env=env).stdout  # the console script
    assert "glmwb" in out and "run" in out
