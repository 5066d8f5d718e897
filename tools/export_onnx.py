"""Export a SAT checkpoint to ONNX: input ``images``, outputs ``logits`` and the localization map ``maps``.

``images`` (B, 3, S, S) is a batch normalised with the ImageNet mean / std at the model's input size S (224 for
the released models); ``logits`` (B, num_classes); ``maps`` (B, S/16, S/16), the fused map of the spatial-aware
blocks (sigmoid probabilities) from which the evaluators draw boxes. The graph is the eval-mode forward with a
dynamic batch dimension, written as one file by torch's default (torch.export-based) exporter, which needs the
`onnx` and `onnxscript` packages. When onnxruntime is installed the file is run on a random batch and compared
with PyTorch; a difference above --atol is an error and nothing is written. An existing .onnx file is replaced
only with --overwrite. Prints one JSON line.

    python tools/export_onnx.py --checkpoint output/demo/checkpoints/best.pth --output sat.onnx
    python tools/export_onnx.py --checkpoint best_loc.pth.tar --output sat.onnx   # an official release file
"""
import argparse
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from Model import build_model_from_checkpoint  # noqa: E402
from utils.config import OneLineParser, at_least  # noqa: E402
from utils.errors import ConfigError, SATError, output_error, run_cli, writing_outputs  # noqa: E402
from utils.outputs import mode_as_opened  # noqa: E402
from utils.preemption import ignore_stop_signals, stopped_as_said  # noqa: E402

INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["logits", "maps"]
TESTED_TORCH = "2.11"  # the oldest torch whose exporter the tests passed with (2.9's failed on official files)


def example_images(model, batch_size, seed=0):
    """A random batch at the model's input size."""
    height, width = model.patch_embed.img_size
    return torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))


def export_onnx(model, path, opset_version=None):
    """Write ``model``'s eval-mode forward ``images -> (logits, maps)`` to ``path``, batch size dynamic."""
    model.eval()
    converter = logging.getLogger("onnxscript")  # its failed conversion to an older opset logs a traceback; the
    level = converter.level                        # opset written is checked after (main), with one line
    converter.setLevel(logging.CRITICAL)
    try:
        torch.onnx.export(model, (example_images(model, 2),), str(path), input_names=INPUT_NAMES,
                          output_names=OUTPUT_NAMES, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                          opset_version=opset_version, external_data=False, dynamo=True, verbose=False)
    except ImportError as err:  # onnx / onnxscript missing
        raise ConfigError(f"exporting to ONNX needs the onnx and onnxscript packages ({err}): "
                          "pip install -r requirements-dev.txt") from None
    except OSError:  # a full disk, a folder that cannot be written: main's one line naming the output, not an
        raise        # exporter failure blamed on the torch version
    except Exception as err:  # the exporter's own failure (e.g. torch 2.9's on official checkpoints' batch dim)
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise SATError(f"torch.onnx.export failed with torch {torch.__version__} ({err.__class__.__name__}: "
                       f"{first}); the export is tested with torch >= {TESTED_TORCH}") from None
    finally:
        converter.setLevel(level)


def written_opset(path):
    """The default-domain opset version of the ONNX file ``path``."""
    import onnx  # the exporter needs it: installed
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def onnxruntime_max_abs_diff(model, path):
    """Run ``path`` with onnxruntime on a random batch of 3: max |ONNX - PyTorch| per output, or None when
    onnxruntime is not installed."""
    try:
        import onnxruntime  # optional: only for this check
    except ImportError:
        return None
    images = example_images(model, 3, seed=1)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: images.numpy()})
    with torch.no_grad():
        expected = model.eval()(images)
    return {name: float((torch.from_numpy(out) - ref).abs().max())
            for name, out, ref in zip(OUTPUT_NAMES, outputs, expected)}


def write_checked(model, output, args):
    """Export to a temporary file beside ``output``, check it (opset, onnxruntime against PyTorch), then move it
    in place; (opset written, max |difference| per output or None without onnxruntime). The temporary file is
    removed whatever happens."""
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    mode_as_opened(fd)
    os.close(fd)
    try:
        export_onnx(model, tmp, args.opset)
        opset = written_opset(tmp)
        if args.opset is not None and opset != args.opset:
            raise SATError(f"{args.output}: the exporter wrote opset {opset}, not the --opset {args.opset} asked "
                           "for; not written")
        diff = onnxruntime_max_abs_diff(model, tmp)
        nonfinite = [name for name, value in (diff or {}).items() if not math.isfinite(value)]
        if nonfinite:  # (NaN > atol is False: such an export passed the check, its JSON line held NaN)
            raise SATError(f"{args.output}: the model outputs NaN/Inf {' and '.join(nonfinite)} on the check batch "
                           f"(a checkpoint whose weights overflow?); not written")
        if diff is not None and max(diff.values()) > args.atol:
            raise SATError(f"{args.output}: onnxruntime differs from PyTorch by {diff} (> --atol {args.atol}); "
                           "not written")
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return opset, diff


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="this project's checkpoint or an official release file")
    parser.add_argument("--arch", help="architecture (default: recorded in the file, or read off its weights' shapes)")
    parser.add_argument("--num-classes", type=int, help="classes (default: read off the head's shape)")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=at_least(1), help="ONNX opset version (default: the exporter's)")
    parser.add_argument("--atol", type=at_least(0, float), default=1e-4,
                        help="largest accepted |ONNX - PyTorch| (default 1e-4)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing .onnx file at --output")
    args = parser.parse_args(argv)

    output = Path(args.output)
    if output.is_dir():
        raise ConfigError(f"--output {output}: a folder; expected the path of the .onnx file to write")
    if output.exists() and output.suffix.lower() != ".onnx":  # e.g. the checkpoint itself: never replaced
        raise ConfigError(f"--output {output}: an existing file that is not an .onnx file (never replaced); "
                          "choose another path")
    if output.exists() and not args.overwrite:
        raise ConfigError(f"--output {output}: holds an earlier export: --overwrite to replace it, or choose "
                          "another path")
    if any(parent.exists() and not parent.is_dir() for parent in output.parents):
        raise ConfigError(f"--output {output}: a parent of it is a file, not a folder")
    model, _ = build_model_from_checkpoint(args.checkpoint, arch=args.arch, num_classes=args.num_classes)
    with writing_outputs(output):  # a folder that cannot be made or written, a full disk: one line
        output.parent.mkdir(parents=True, exist_ok=True)
    with stopped_as_said(f"stopped: {output} not written"):
        try:
            opset, diff = write_checked(model, output, args)
        except OSError as err:  # (met writing the temporary file: the line names the output, left as it was)
            raise output_error(OSError(err.errno, err.strerror or str(err)), output) from None
    height, width = model.patch_embed.img_size
    record = {"output": str(output), "checkpoint": str(args.checkpoint), "opset": opset,
              "inputs": {"images": ["batch", 3, height, width]},
              "outputs": {"logits": ["batch", model.num_classes], "maps": ["batch", *model.grid_size]},
              "onnxruntime_max_abs_diff": diff if diff is not None else "onnxruntime not installed: not checked"}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    run_cli(main)
    ignore_stop_signals()  # the work is complete
