"""`captioner export`: write a model as ONNX files for the torch-free runtime (export.py, runtime.py)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("captioner")

#: the largest difference from torch an fp32 export may show on `compare`'s check before it is refused
FP32_TOLERANCE = 1e-3


def add(sub) -> None:
    c = sub.add_parser(
        "export",
        help="write a model as ONNX files that caption without torch (onnxruntime + numpy)",
        description="Export a checkpoint to a folder of ONNX files (encoder, ImageNet classifier, decoder "
        "init and one decoder step, opset 17, dynamic batch) with a JSON manifest (vocabulary, preprocessing, "
        "decoding defaults) and guidance.npz (tags guidance and confidence). `captioner caption --model DIR`, "
        "`captioner serve --model DIR` and `Captioner.load(DIR)` then run on onnxruntime, also where torch "
        "is not installed: numpy, pillow and onnxruntime (requirements-runtime.txt, then the project with "
        "--no-deps; serve also needs fastapi, uvicorn, python-multipart and swagger-ui-bundle). The export "
        "is checked against torch on random pixels.",
    )
    c.add_argument("--model", metavar="CKPT", help="checkpoint (default: the bundled model)")
    c.add_argument("--out", required=True, metavar="DIR", help="the export folder (a new one, or an earlier export)")
    c.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8: dynamic int8 weights for the decoder: half the size, CIDEr-D within 0.01 of fp32 "
        "(see docs/deploy.md); fp32 unless given",
    )
    c.add_argument("--quiet", action="store_true", help="print nothing but errors")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import CheckpointError
    from ..export import compare, export
    from ..model import Model

    model = Model.load(args.model, device="cpu")
    diffs: dict[str, float] = {}

    def check(folder) -> None:  # on the finished export, before it takes --out's place
        diffs.update(compare(model, folder))
        if args.quantize is None and max(diffs.values()) > FP32_TOLERANCE:
            shown = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
            raise CheckpointError(
                f"{args.out}: not written: the export differs from the model by more than {FP32_TOLERANCE:g} ({shown})"
            )

    manifest = export(model, args.out, quantize=args.quantize, check=check)
    shown = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    if not args.quiet:
        files = [f for f in manifest["files"].values() if f]
        print(f"{args.out}: {', '.join(files)} (opset {manifest['opset']}, {args.quantize or 'fp32'})")
        print(f"largest difference from torch on random pixels: {shown}")
    return 0
