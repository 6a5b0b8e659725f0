"""The documentation site builds with `mkdocs build --strict`, and its example files are valid."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS_PACKAGES = {"mkdocs": "mkdocs", "material": "mkdocs-material", "mkdocstrings_handlers.python": "mkdocstrings"}


def _missing_docs_packages() -> list[str]:
    missing = []
    for module, package in DOCS_PACKAGES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(package)
    return missing


def test_mkdocs_build_strict(tmp_path):
    missing = _missing_docs_packages()
    if missing:
        pytest.skip(f"documentation packages not installed: {', '.join(missing)} (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(site)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    api = (site / "api" / "index.html").read_text()
    for name in ("sam_hf.viz.plot_base_vs_tuned", "sam_hf.inference.SamPredictor", "sam_hf.trainer.SamTrainer"):
        assert f'id="{name}"' in api, name
    assert "`float`" not in api  # HF-style argument types are rendered as types, not as raw markdown
    for page in ("ja/index.html", "ja/quickstart/index.html", "ja/training/index.html", "ja/inference/index.html"):
        assert (site / page).is_file(), page
    training = (site / "training" / "index.html").read_text()
    assert "main_process_ip" in training  # the multi-node accelerate config is included in the page


@pytest.mark.parametrize("name", ["multi_gpu.yaml", "multi_node.yaml"])
def test_accelerate_example_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "docs" / "accelerate" / name))
    assert config.distributed_type == "MULTI_GPU"
    assert config.mixed_precision == "bf16"
    assert config.num_processes == 8 * config.num_machines


def test_hf_style_docstring_rewrite():
    spec = importlib.util.spec_from_file_location("hf_docstrings", REPO / "docs" / "_ext" / "hf_docstrings.py")
    if importlib.util.find_spec("griffe") is None:
        pytest.skip("griffe (installed with mkdocstrings[python]) is not installed")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (
        "Summary.\n\nArgs:\n"
        "    alpha (`float`, *optional*, defaults to 0.5): opacity.\n"
        '    color (*optional*, defaults to `"lime"`): edge colour.\n'
        "    device (`str` or `torch.device`, *optional*): where.\n"
        "    masks: `(K, H, W)` masks (unchanged).\n"
        "    train (`bool`): training or not.\n"
    )
    assert module.rewrite(text).splitlines()[3:] == [
        "    alpha (float): opacity.",
        "    color: edge colour.",
        "    device (str | torch.device): where.",
        "    masks: `(K, H, W)` masks (unchanged).",
        "    train (bool): training or not.",
    ]


def test_bad_input_table_names_existing_tests():
    """Every row of docs/bad-inputs.md names at least one test, and every named test exists."""
    import ast
    import re

    rows = [
        line
        for line in (REPO / "docs" / "bad-inputs.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith(("| input ", "|---"))
    ]
    assert len(rows) >= 30
    defined: dict[str, set[str]] = {}
    missing = []
    for row in rows:
        named = re.findall(r"`tests/(test_\w+\.py)::(test_\w+)`", row.rsplit("|", 2)[-2])
        if not named:
            missing.append(f"no test named in: {row[:80]}")
        for file, name in named:
            if file not in defined:
                path = REPO / "tests" / file
                tree = ast.parse(path.read_text()) if path.is_file() else ast.Module(body=[], type_ignores=[])
                defined[file] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            if name not in defined[file]:
                missing.append(f"tests/{file}::{name} does not exist")
    assert not missing, "\n".join(missing)
