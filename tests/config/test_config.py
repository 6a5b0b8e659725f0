"""The argument dataclasses and their parser: config files, flags given after them, defaults that depend on other
flags, and the checks that name the flag."""

from __future__ import annotations

import json

import pytest
import yaml

from sam_hf import parse_args
from sam_hf.config import DataArguments, SamArguments, config_to_argv, default_output_dir, multimask_stride

BASE = ["--model_name_or_path", "models/tiny-sam-base", "--dataset_name", "data/nuclei_demo"]


def test_a_yaml_config_alone_and_with_flags_after_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "models/tiny-sam-base",
                "dataset_name": "data/nuclei_demo",
                "output_dir": str(tmp_path / "out"),
                "box_jitter": 3.5,
                "max_steps": 7,
                "multimask_training": True,
            }
        )
    )
    model_args, data_args, sam_args, training_args = parse_args([str(config)])
    assert (sam_args.box_jitter, training_args.max_steps, sam_args.multimask_training) == (3.5, 7, True)
    assert model_args.model_name_or_path == "models/tiny-sam-base"
    # Flags after the file override it; the others keep the file's values.
    _, _, sam_args, training_args = parse_args([str(config), "--max_steps", "9"])
    assert (training_args.max_steps, sam_args.box_jitter) == (9, 3.5)


def test_config_to_argv_spells_booleans_and_lists_as_flags(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"multimask_training": False, "lora_target_modules": ["qkv", "proj"], "seed": 3}))
    assert config_to_argv(str(config)) == [
        "--multimask_training", "false", "--lora_target_modules", "qkv", "proj", "--seed", "3",
    ]  # fmt: skip
    config.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=rf"Config {config} must hold a mapping"):
        config_to_argv(str(config))


def test_output_dir_default_is_named_after_model_and_dataset_unless_given_in_any_spelling(tmp_path):
    assert default_output_dir("facebook/sam-vit-base", "someone/nuclei") == "runs/sam-vit-base-nuclei"
    *_, training_args = parse_args(BASE)
    assert training_args.output_dir == "runs/tiny-sam-base-nuclei_demo"
    given = str(tmp_path / "mine")
    # argparse reads --output-dir, --output_dir=x and an unambiguous prefix as the same flag.
    for spelling in (["--output-dir", given], [f"--output_dir={given}"], ["--output_d", given]):
        *_, training_args = parse_args(BASE + spelling)
        assert training_args.output_dir == given, spelling


@pytest.mark.parametrize(
    ("flags", "stride"),
    [([], 8), (["--multimask_every", "3"], 3), (["--multimask_every", "0"], 0), (["--multimask_training"], 1)],
)
def test_multimask_stride(flags, stride):
    _, _, sam_args, _ = parse_args(BASE + ["--output_dir", "unused"] + flags)
    assert multimask_stride(sam_args) == stride


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_size": 256, "object_crop_scale": 6.0}, "--object_crop_scale and --tile_size"),
        ({"point_crop_scale": 2.0}, "--point_crop_scale .* needs --object_crop_scale"),
    ],
)
def test_data_arguments_name_the_flag_that_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataArguments(dataset_name="data/nuclei_demo", **kwargs)


def test_sam_arguments_name_the_flag_that_is_wrong():
    with pytest.raises(ValueError, match="--lambda_dice and --lambda_ce must be >= 0 and not both 0"):
        SamArguments(lambda_dice=0.0, lambda_ce=0.0)
    with pytest.raises(ValueError, match="--box_jitter must be >= 0 pixels, got -1.0"):
        SamArguments(box_jitter=-1.0)


def test_point_crops_without_the_point_pass_fail_at_parse_time():
    argv = BASE + ["--object_crop_scale", "6", "--point_crop_scale", "2", "--multimask_every", "0"]
    with pytest.raises(ValueError, match="--point_crop_scale cuts crops for the multimask point pass"):
        parse_args(argv)
