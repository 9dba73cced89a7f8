"""Console scripts `kandinsky-precompute` and `kandinsky-train`: declared, installed, immune to a local train.py."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"kandinsky-precompute": "precompute.cli:main", "kandinsky-train": "train.__main__:main"}


def test_console_scripts_are_declared_and_load_our_entry_points():
    import precompute.cli
    import train.__main__

    found = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name in SCRIPTS}
    assert {name: ep.value for name, ep in found.items()} == SCRIPTS
    assert found["kandinsky-train"].load() is train.__main__.main
    assert found["kandinsky-precompute"].load() is precompute.cli.main
    assert 'kandinsky-train = "train.__main__:main"' in (ROOT / "pyproject.toml").read_text()


def test_precompute_dispatches_the_prompts_mode(capsys):
    from precompute.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["prompts", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: kandinsky-precompute prompts")


def script(name: str) -> str:
    """The installed console script (next to this interpreter in a venv)."""
    path = Path(sysconfig.get_path("scripts")) / name
    assert path.is_file(), f"{name} is not installed: pip install -e ."
    return str(path)


@pytest.mark.slow
def test_a_local_train_py_shadows_the_module_form_but_not_the_console_script(tmp_path):
    (tmp_path / "train.py").write_text('print("the user\'s own train.py"); raise SystemExit(3)\n')
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    ours = subprocess.run([script("kandinsky-train"), "prior", "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert ours.returncode == 0 and ours.stdout.startswith("usage: kandinsky-train prior")
    shadowed = subprocess.run([sys.executable, "-m", "train", "prior", "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
    assert shadowed.returncode == 3 and "the user's own train.py" in shadowed.stdout  # what README warns about
    assert Path(script("kandinsky-precompute")).read_text().count("precompute.cli") == 1  # pip's wrapper
