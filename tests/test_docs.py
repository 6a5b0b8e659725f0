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


@pytest.mark.slow
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
    for name in (
        "sam_hf.viz.plots.plot_base_vs_tuned",
        "sam_hf.inference.predictor.SamPredictor",
        "sam_hf.training.trainer.SamTrainer",
    ):
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
        named = re.findall(r"`tests/((?:\w+/)?test_\w+\.py)::(test_\w+)`", row.rsplit("|", 2)[-2])
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


# --------------------------------------------------------------------------------------------------------------------
# The README's commands run as printed on a fresh clone
# --------------------------------------------------------------------------------------------------------------------

# How a command may start: the Makefile, or a tool of the .venv that `make demo` / `make test` creates. A bare
# `python` or `sam-hf` fails (or runs another interpreter) unless the user happens to have activated the venv.
COMMAND_STARTS = (
    "make",
    "python3",
    *(f".venv/bin/{tool}" for tool in ("python", "pip", "sam-hf", "accelerate", "hf")),
)


def _shell_commands(markdown: str) -> list[str]:
    """Every command of the ```bash blocks: continuation lines joined, comments dropped, `&&` chains split."""
    import re

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


def _argv(command: str) -> list[str]:
    import shlex

    argv = shlex.split(command)
    while argv and "=" in argv[0] and not argv[0].startswith("-"):  # HF_HUB_OFFLINE=1 ...
        argv.pop(0)
    return argv


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"readme_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "page", ["README.md", *(str(p.relative_to(REPO)) for p in sorted((REPO / "docs").rglob("*.md")))]
)
def test_commands_use_the_venv(page):
    for command in _shell_commands((REPO / page).read_text()):
        argv = _argv(command)
        if argv and not argv[0].startswith("-") and argv[0] not in ("docker", "curl", "cd", "export", "source"):
            assert argv[0] in COMMAND_STARTS, f"{page}: {command!r} needs an activated venv; use .venv/bin/..."


def test_readme_commands_parse_and_name_what_exists(monkeypatch):
    """Each command of the README, then of the quickstart page (which holds the commands to run after the demo), in
    order: its script exists, its flags parse with the script's own parser (nothing runs), and every model, run, image
    and dataset it reads exists in the repository or is written by an earlier command. Boxes given to predict.py are
    boxes of real objects of the image."""
    import numpy as np
    import yaml
    from PIL import Image
    from transformers import HfArgumentParser

    from sam_hf.apps.cli import build_parser
    from sam_hf.apps.predict import PredictArguments, parse_coordinates
    from sam_hf.config.arguments import DataArguments
    from sam_hf.config.parser import parse_args
    from sam_hf.core.masks import boxes_from_instances, mask_to_instances
    from sam_hf.evaluation.arguments import EvaluateArguments

    monkeypatch.chdir(REPO)
    created: set[str] = set()

    def exists(path: str) -> bool:
        path = str(Path(path))
        return (REPO / path).exists() or any(path == c or path.startswith(c + "/") for c in created)

    checked = set()
    pages = ("README.md", "docs/quickstart.md")
    for command in [c for page in pages for c in _shell_commands((REPO / page).read_text())]:
        if "<" in command:  # a template with placeholders (real use on the Hub)
            continue
        argv = _argv(command)
        if argv[:2] == ["make", "demo"]:
            created.add(yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["output_dir"])
        if argv[0] != ".venv/bin/python" and argv[0] != ".venv/bin/sam-hf":
            continue
        if argv[0] == ".venv/bin/sam-hf":
            args = build_parser().parse_args(argv[1:])
            assert exists(args.model), f"{command!r}: --model {args.model} is not made by an earlier command"
            checked.add("sam-hf")
            continue
        if argv[1] == "-m":
            continue
        script, flags = argv[1], argv[2:]
        assert (REPO / script).is_file(), f"{command!r}: {script} does not exist"
        name = Path(script).stem
        if name == "train":
            model_args, data_args, _, training_args = parse_args(flags)
            assert exists(model_args.model_name_or_path) and exists(data_args.dataset_name), command
            created.add(str(Path(training_args.output_dir)))
        elif name == "evaluate":
            eval_args, data_args = HfArgumentParser((EvaluateArguments, DataArguments)).parse_args_into_dataclasses(
                args=flags
            )
            for spec in eval_args.model:
                assert exists(spec.split("=", 1)[-1]), f"{command!r}: {spec} is not made by an earlier command"
            assert exists(data_args.dataset_name), command
            created.add(str(Path(eval_args.output_dir)))
        elif name == "predict":
            (args,) = HfArgumentParser(PredictArguments).parse_args_into_dataclasses(args=flags)
            assert exists(args.model), f"{command!r}: --model {args.model} is not made by an earlier command"
            image = Path(args.images)
            assert image.is_file(), f"{command!r}: {image} does not exist"
            instances = REPO / "data" / "nuclei_demo" / "instances" / f"{image.stem}.png"
            real = boxes_from_instances(mask_to_instances(np.asarray(Image.open(instances)), "instance"))
            for box in parse_coordinates(args.boxes, 4, "boxes"):
                assert (real == np.asarray(box)).all(1).any(), f"{command!r}: {box} is no object's box"
            created.add(str(Path(args.output_dir)))
        elif name == "compare_runs":
            args = _load_script("compare_runs").parse_args(flags)
            for run in args.runs:
                assert exists(run), f"{command!r}: {run} is not made by an earlier command"
        checked.add(name)
    assert checked == {"train", "evaluate", "predict", "compare_runs", "sam-hf"}


def _demo_table(page: str) -> list[tuple[str, ...]]:
    import re

    text = (REPO / page).read_text()
    return [
        tuple(re.findall(r"\d\.\d{3}|\d+", line))
        for line in text.splitlines()
        if line.startswith("| ")
        and ("0." in line)
        and (
            "tiny base" in line
            or "fill" in line
            or "after" in line
            or "ファインチューニング" in line
            or "ベースライン" in line
        )
    ]


def test_demo_numbers_agree_across_pages():
    """The demo's before / after / baseline table is the same in the README and both quickstarts, and the gains
    quoted below it are the differences of its numbers."""
    import re

    tables = {page: _demo_table(page) for page in ("README.md", "docs/quickstart.md", "docs/ja/quickstart.md")}
    assert len(tables["README.md"]) == 3
    assert tables["docs/quickstart.md"] == tables["README.md"] == tables["docs/ja/quickstart.md"]
    (before_dice, before_iou), after, (baseline,) = tables["README.md"]
    step, after_dice, after_iou = after
    text = (REPO / "README.md").read_text()
    gain = re.search(r"\+(\d\.\d{3}) Dice, \+(\d\.\d{3}) IoU", text)
    assert gain, "the README quotes the gain as +x.xxx Dice, +y.yyy IoU"
    assert float(gain[1]) == pytest.approx(float(after_dice) - float(before_dice), abs=1.5e-3)
    assert float(gain[2]) == pytest.approx(float(after_iou) - float(before_iou), abs=1.5e-3)
