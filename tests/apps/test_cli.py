"""The `sam-hf` command line: its subcommands, the limits' value parsing, and the errors that name the flag."""

from __future__ import annotations

import argparse

import pytest

from sam_hf.apps.cli import MODEL_ENV, _positive_float, _positive_int, build_parser, main


def test_version_and_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("sam-hf ")
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "COMMAND" in capsys.readouterr().err
    for command, flag in (("serve", "--max-upload-bytes"), ("autolabel", "--object_crop_scale")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert flag in capsys.readouterr().out


@pytest.mark.parametrize(("text", "value"), [("1", 1), ("64", 64), ("4e7", 40_000_000)])
def test_positive_int_accepts(text, value):
    assert _positive_int(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "1.5", "abc", "1e400"])
def test_positive_int_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"expected a positive integer, got '{text}'"):
        _positive_int(text)


@pytest.mark.parametrize("text", ["0", "-1", "inf", "nan", "x"])
def test_positive_float_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"expected a positive number, got '{text}'"):
        _positive_float(text)


def test_serve_limits_reach_their_settings_fields():
    args = build_parser().parse_args(["serve", "--model", "m", "--max-prompts", "7", "--request-timeout", "2.5"])
    assert (args.max_prompts, args.request_timeout_s) == (7, 2.5)
    # Unset limits default to the server's own settings.
    settings = pytest.importorskip("sam_hf.apps.serve.settings").ServeSettings()
    assert (args.max_upload_bytes, args.max_pending) == (settings.max_upload_bytes, settings.max_pending)


def test_serve_without_a_model_names_the_flag_and_the_variable(monkeypatch, capsys):
    pytest.importorskip("fastapi")
    monkeypatch.delenv(MODEL_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["serve"])
    assert exit_.value.code == 2
    assert f"give --model <directory or Hub id>, or set ${MODEL_ENV}" in capsys.readouterr().err


def test_serve_refuses_a_bad_limit(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "m", "--max-prompts", "0"])
    assert exit_.value.code == 2 and "--max-prompts: expected a positive integer, got '0'" in capsys.readouterr().err


def test_autolabel_refuses_a_bad_value_with_the_flag(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["autolabel", "--model", "m", "--images", str(images), "--output_dir", str(tmp_path / "out"),
              "--object_crop_scale", "-1"])  # fmt: skip
    assert exit_.value.code == 2 and "--object_crop_scale" in capsys.readouterr().err
