"""The `sam-hf` command line.

```bash
sam-hf serve --model runs/demo --host 127.0.0.1 --port 8000
sam-hf autolabel --model runs/demo --images my_images --output_dir my_labels
```

Each subcommand is a function `_<name>(args) -> int` registered by `_add_<name>_parser`; `build_parser` lists them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

logger = logging.getLogger(__name__)


#: Environment variable holding the model of `sam-hf serve` when `--model` is not given (used by the Dockerfile).
MODEL_ENV = "SAM_HF_MODEL"


def _version() -> str:
    try:
        return metadata.version("sam_hf")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _positive_int(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)  # accepts 4e7
    except (ValueError, OverflowError) as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from err
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# (flag, ServeSettings field, argparse type, help); defaults come from ServeSettings.
_SERVE_LIMITS = [
    ("--max-upload-bytes", "max_upload_bytes", _positive_int, "largest request body in bytes (413 above)"),
    ("--max-image-pixels", "max_image_pixels", _positive_int, "largest image width x height (413 above)"),
    ("--max-prompts", "max_prompts", _positive_int, "most prompts per /segment request (422 above)"),
    ("--max-points-per-prompt", "max_points_per_prompt", _positive_int, "most points in one prompt (422 above)"),
    ("--max-boxes-and-points", "max_boxes_and_points", _positive_int, "most boxes + points per request (413 above)"),
    ("--max-mask-pixels", "max_mask_pixels", _positive_int, "most mask pixels in one response (413 above)"),
    ("--max-auto-points", "max_auto_points", _positive_int, "largest points_per_side of /segment/auto (422 above)"),
    ("--request-timeout", "request_timeout_s", _positive_float, "seconds per request before a 504"),
    ("--max-pending", "max_pending", _positive_int, "requests in flight at once (503 above)"),
    ("--workers", "workers", _positive_int, "threads decoding images and encoding masks"),
]


def _add_serve_parser(subparsers: Any) -> None:
    try:
        from .serve.settings import ServeSettings

        defaults = ServeSettings()
    except ImportError:  # the serve extra is not installed; `_serve` says how to install it
        defaults = None
    parser = subparsers.add_parser(
        "serve",
        help="serve a SAM checkpoint over HTTP (FastAPI + uvicorn)",
        description="Serve a SAM checkpoint over HTTP: GET /health, POST /segment (box and point prompts) and "
        "POST /segment/auto (automatic masks). The model loads once at start-up. See docs/serving.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV),
        help=f"directory written by save_pretrained (model and processor) or a Hub id; defaults to ${MODEL_ENV}",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 listens on all interfaces")
    parser.add_argument("--port", type=int, default=8000, help="port to bind")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda; cuda if available else cpu")
    limits = parser.add_argument_group("limits")
    for flag, field, kind, text in _SERVE_LIMITS:
        limits.add_argument(flag, dest=field, type=kind, default=getattr(defaults, field, None), help=text)
    parser.add_argument(
        "--text-model",
        default=getattr(defaults, "text_model", None),
        help="CLIPSeg checkpoint for the `text` field of /segment (Hub id or directory); loaded on first use",
    )
    parser.add_argument(
        "--object-crop-scale",
        type=float,
        default=None,
        help="decode each box prompt on its own square crop, this many times the box's longer side, and refine "
        "automatic masks the same way; defaults to the scale the model was tuned with (config.json "
        "object_crop_scale); 0 turns it off",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level of sam_hf and uvicorn",
    )
    parser.set_defaults(func=_serve, parser=parser)


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .serve.app import create_app
        from .serve.settings import ServeSettings
    except ImportError as err:
        args.parser.error(f"serving needs the serve extra ({err}); install it with pip install 'sam_hf[serve]'")
    if not args.model:
        args.parser.error(f"give --model <directory or Hub id>, or set ${MODEL_ENV}")
    limits = {field: getattr(args, field) for _, field, _, _ in _SERVE_LIMITS}
    settings = ServeSettings(
        device=args.device, text_model=args.text_model, object_crop_scale=args.object_crop_scale, **limits
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("Serving %s on http://%s:%d with %s", args.model, args.host, args.port, settings)
    uvicorn.run(create_app(args.model, settings=settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _add_autolabel_parser(subparsers: Any) -> None:
    from dataclasses import fields

    from transformers import HfArgumentParser

    from .autolabel import AutolabelArguments

    parser = subparsers.add_parser(
        "autolabel",
        help="label a folder of images with automatic SAM masks, as a training folder",
        description="Automatic masks (transformers' mask-generation pipeline) for every image of a folder, written "
        "as images/, masks/ and instances/ (or a saved datasets dataset) that --dataset_name reads back, with a "
        "contact sheet. See docs/autolabel.md.",
        parents=[HfArgumentParser(AutolabelArguments, add_help=False)],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.set_defaults(func=_autolabel, parser=parser, dataclass_fields=[f.name for f in fields(AutolabelArguments)])


def _autolabel(args: argparse.Namespace) -> int:
    from .autolabel import AutolabelArguments, run_autolabel

    try:
        settings = AutolabelArguments(**{name: getattr(args, name) for name in args.dataclass_fields})
    except ValueError as err:
        args.parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_autolabel(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `sam-hf` parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="sam-hf", description="Fine-tune and serve Segment Anything (SAM) with Hugging Face transformers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve_parser(subparsers)
    _add_autolabel_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sam-hf` console script.

    Args:
        argv (`Sequence[str]`, *optional*): arguments without the program name; `sys.argv[1:]` by default.

    Returns:
        `int`: the exit status.
    """
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
