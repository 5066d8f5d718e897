"""Figure 1 of the paper: GT-known Loc on ImageNet against (a) training images per class and (b) the
number of fine-tuned parameters, measured by this code beside the paper's points.

    # print (or, with --execute, run one after the other) the training runs of the sweep
    python tools/figure1.py run --data-root /data/ILSVRC2012 --runs-dir output/figure1 \\
        [--launcher "torchrun --nproc_per_node 8"] [--execute]
    # collect the runs' results.json into a table and draw the figure
    python tools/figure1.py collect output/figure1 [--output img/figure1.png]

The sweep: config/ILSVRC_fewshot.yaml with 1 / 3 / 5 / 10 images per class (everything trained), and
config/ILSVRC.yaml on the full training set with ``--trainable last:k`` (the head, the spatial token and
the last k blocks) for k = 0 / 3 / 6 / 9, plus the full run (everything trained on all images). ``collect``
reads every ``results.json`` below the folder with the ``config.yaml`` beside it; it writes
``figure1.json`` there and the PNG. A run with both fewer images per class and a trainable subset is in
neither curve: a warning names it.
"""
import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from utils.config import OneLineParser, read_yaml_mapping  # noqa: E402
from utils.errors import ConfigError, DataError, run_cli, writing_outputs  # noqa: E402
from utils.outputs import read_json, write_text_atomic  # noqa: E402
from utils.visualize import write_image  # noqa: E402
SHOTS = (1, 3, 5, 10)
LAST_BLOCKS = (0, 3, 6, 9)
# The paper's Figure 1 (ImageNet, DeiT-S): GT-known Loc per training images per class (None: all), and
# per fine-tuned parameters in millions, read off the figure's bubble sizes (approximate).
PAPER_SHOTS = {1: 70.9, 3: 71.9, 5: 72.6, 10: 72.9, None: 73.1}
PAPER_PARAMS = {4.5: 71.4, 9.0: 72.2, 15.0: 72.9, 20.0: 73.1}


# ------------------------------------------------------------------------------------------- sweep
def sweep(data_root, runs_dir, launcher="python"):
    """(run folder, command) of each training run of the figure."""
    base = [*shlex.split(launcher), "train_ImageNet.py", "--data-root", str(data_root)]
    runs = [(Path(runs_dir) / "full", [*base, "--config", "config/ILSVRC.yaml"])]
    runs += [(Path(runs_dir) / f"shots_{n}", [*base, "--config", "config/ILSVRC_fewshot.yaml",
                                              "--images-per-class", str(n)]) for n in SHOTS]
    runs += [(Path(runs_dir) / f"last_{k}", [*base, "--config", "config/ILSVRC.yaml", "--trainable", f"last:{k}"])
             for k in LAST_BLOCKS]
    return [(folder, [*command, "--output-dir", str(folder)]) for folder, command in runs]


# ----------------------------------------------------------------------------------------- collect
def collect(runs_dir):
    """Rows {run, images_per_class, trainable, trainable_params, gt_known_loc} of every finished run
    (a results.json with its config.yaml) below ``runs_dir``, sorted by folder."""
    rows = []
    for results_path in sorted(Path(runs_dir).rglob("results.json")):
        config_path = results_path.parent / "config.yaml"
        if not config_path.is_file():
            raise DataError(f"{config_path}: missing (every run folder has the config.yaml of its run)")
        results = read_json(results_path)
        config = read_yaml_mapping(config_path)
        missing = [key for key in ("gt_known_loc", "trainable_params") if key not in results]
        if missing:
            raise DataError(f"{results_path}: no {', '.join(missing)} (a results.json of train.py expected)")
        rows.append({"run": str(results_path.parent.relative_to(runs_dir)), "data_format": config.get("data_format"),
                     "images_per_class": config.get("images_per_class"), "trainable": config.get("trainable", "all"),
                     "trainable_params": int(results["trainable_params"]),
                     "gt_known_loc": float(results["gt_known_loc"])})
    return rows


def doubts(rows):
    """Warnings on what ``rows`` plot beside the paper's ImageNet points: runs on other data, runs that are
    the same point of the sweep (same images per class and trainable part), and runs in neither curve."""
    lines = []
    neither = [f"{row['run']} (images_per_class {row['images_per_class']}, trainable {row['trainable']})"
               for row in rows if row["trainable"] != "all" and row["images_per_class"] is not None]
    if neither:
        lines.append(f"{len(neither)} run(s) in neither curve nor the table (curve (a) trains everything, (b) "
                     "uses all images; these set both; kept in figure1.json): "
                     + ", ".join(neither[:3]) + (", ..." if len(neither) > 3 else ""))
    other = [f"{row['run']} ({row['data_format']})" for row in rows if row["data_format"] not in (None, "imagenet")]
    if other:
        lines.append(f"{len(other)} run(s) not trained on ImageNet, drawn beside the paper's ImageNet points: "
                     + ", ".join(other[:3]) + (", ..." if len(other) > 3 else ""))
    first = {}
    for row in rows:
        point = (row["images_per_class"], row["trainable"])
        if point in first:
            lines.append(f"{first[point]} and {row['run']} are the same point of the sweep (images_per_class "
                         f"{point[0] or 'all'}, trainable {point[1]}): both are drawn")  # (None: every image)
        first.setdefault(point, row["run"])
    return lines


def curves(rows):
    """The two measured curves: (a) [(images per class or None for all, GT-known Loc)] of the runs that
    train everything, by images per class with the full-data run last; (b) [(trainable parameters in
    millions, GT-known Loc)] of the full-data runs, by parameters."""
    shots = sorted(((row["images_per_class"], row["gt_known_loc"]) for row in rows if row["trainable"] == "all"),
                   key=lambda point: float("inf") if point[0] is None else point[0])
    params = sorted((row["trainable_params"] / 1e6, row["gt_known_loc"]) for row in rows
                    if row["images_per_class"] is None)
    return shots, params


# -------------------------------------------------------------------------------------------- draw
INK, GRID, OURS, PAPER = (40, 40, 40), (225, 225, 225), (40, 40, 220), (150, 150, 150)  # BGR
FONT = cv2.FONT_HERSHEY_SIMPLEX


def grid_step(ylo, yhi):
    """The y grid's step: 1 point over the paper's few-point ranges, coarser so that a wide range (a smoke run
    far from the paper) gets at most 10 labels rather than a column of overprinted ones."""
    return next(step for step in (1, 2, 5, 10, 20, 25, 50, 100) if (yhi - ylo) / step <= 10)


def label_baseline(py, below, top, bottom, text_height=10):
    """The baseline row of the value label of a point at row ``py``: below the point (``below``) or above it,
    on the other side where that one would leave the frame's rows [top, bottom] (a point at the bottom of the
    range had its label drawn under the frame, over the x tick labels), else kept inside."""
    spots = (py + 22, py - 10) if below else (py - 10, py + 22)
    inside = [y for y in spots if top + text_height + 2 <= y <= bottom - 3]
    return inside[0] if inside else min(max(spots[0], top + text_height + 2), bottom - 3)


def _panel(img, x0, title, xlabel, ticks, measured, paper, y_range):
    """One plot in the 480 x 420 px area starting at column ``x0``; ``ticks`` [(x, label)], points
    [(x, y)] in the same x units."""
    left, top, width, height = x0 + 60, 40, 390, 320
    (xlo, xhi), (ylo, yhi) = (min(t for t, _ in ticks), max(t for t, _ in ticks)), y_range
    xlo, xhi = xlo - 0.06 * (xhi - xlo), xhi + 0.06 * (xhi - xlo)

    def at(x, y):
        return (int(left + (x - xlo) / (xhi - xlo) * width), int(top + height - (y - ylo) / (yhi - ylo) * height))

    step = grid_step(ylo, yhi)
    for y in np.arange(np.ceil(ylo / step) * step, yhi + 1e-9, step):
        cv2.line(img, at(xlo, y), at(xhi, y), GRID, 1)
        cv2.putText(img, f"{y:g}", (left - 30, at(xlo, y)[1] + 5), FONT, 0.45, INK, 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (left + width, top + height), INK, 1)
    for x, text in ticks:
        px = at(x, ylo)[0]
        cv2.line(img, (px, top + height), (px, top + height + 5), INK, 1)
        cv2.putText(img, text, (px - 4 * len(text), top + height + 22), FONT, 0.45, INK, 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (left + width // 2 - 5 * len(xlabel), top + height + 48), FONT, 0.5, INK, 1,
                cv2.LINE_AA)
    cv2.putText(img, title, (left, top - 14), FONT, 0.55, INK, 1, cv2.LINE_AA)
    for points, color, marker, below in ((paper, PAPER, cv2.MARKER_STAR, False),
                                         (measured, OURS, cv2.MARKER_DIAMOND, True)):
        pixels = [at(x, min(max(y, ylo), yhi)) for x, y in points]
        for p, q in zip(pixels, pixels[1:]):
            cv2.line(img, p, q, color, 2, cv2.LINE_AA)
        for (x, y), p in zip(points, pixels):
            cv2.drawMarker(img, p, color, marker, 14, 2, cv2.LINE_AA)
            cv2.putText(img, f"{y:.1f}", (p[0] - 14, label_baseline(p[1], below, top, top + height)), FONT, 0.4,
                        color, 1, cv2.LINE_AA)
    for i, (name, color) in enumerate((("this code", OURS), ("paper", PAPER))):
        y = top + height - 40 + 18 * i
        cv2.line(img, (left + width - 110, y), (left + width - 85, y), color, 2, cv2.LINE_AA)
        cv2.putText(img, name, (left + width - 78, y + 5), FONT, 0.45, color, 1, cv2.LINE_AA)


def draw(shots, params, path):
    """Write the two-panel PNG: GT-known Loc against images per class (the full training set at 'full')
    and against fine-tuned parameters, the measured points beside the paper's."""
    def shot_x(n, full_at):
        return full_at if n is None else n

    full_at = 15  # where 'full' sits on the images-per-class axis
    paper_shots = [(shot_x(n, full_at), y) for n, y in PAPER_SHOTS.items()]
    measured_shots = [(shot_x(n, full_at), y) for n, y in shots]
    values = [y for _, y in [*paper_shots, *measured_shots, *params, *PAPER_PARAMS.items()]]
    y_range = (np.floor(min(values)) - 0.5, np.ceil(max(values)) + 0.5)
    img = np.full((440, 960, 3), 255, np.uint8)
    _panel(img, 0, "GT-known Loc vs training images per class", "images per class",
           [(n, str(n)) for n in SHOTS] + [(full_at, "full")], measured_shots, paper_shots, y_range)
    xmax = max([20.0, *(x for x, _ in params)])
    _panel(img, 480, "GT-known Loc vs fine-tuned parameters", "fine-tuned parameters (M)",
           [(x, f"{x:g}") for x in np.arange(0, xmax + 1e-9, 5.0)], params, sorted(PAPER_PARAMS.items()), y_range)
    path = Path(path)
    with writing_outputs(path):  # a full disk, a folder that cannot be written: one line
        path.parent.mkdir(parents=True, exist_ok=True)
        write_image(path, img)


# ---------------------------------------------------------------------------------------------- cli
def table(shots, params):
    lines = ["| images per class | GT-known Loc | paper |", "| --: | --: | --: |"]
    lines += [f"| {'full' if n is None else n} | {y:.2f} | {PAPER_SHOTS.get(n, float('nan')):.1f} |" for n, y in shots]
    lines += ["", "| fine-tuned parameters (M) | GT-known Loc |", "| --: | --: |"]
    lines += [f"| {x:.2f} | {y:.2f} |" for x, y in params]
    return "\n".join(lines)


def main(argv=None):
    parser = OneLineParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="print (or run with --execute) the sweep's training commands", allow_abbrev=False)
    run.add_argument("--data-root", required=True, help="ILSVRC2012 folder")
    run.add_argument("--runs-dir", default="output/figure1",
                     help="one run folder per point is made in it (default %(default)s)")
    run.add_argument("--launcher", default="python",
                     help='e.g. "torchrun --nproc_per_node 8" or "srun python" (default %(default)s)')
    run.add_argument("--execute", action="store_true", help="run the commands one after the other (skips runs "
                                                            "whose results.json exists)")
    coll = sub.add_parser("collect", help="table and PNG from the runs' results.json files", allow_abbrev=False)
    coll.add_argument("runs_dir", help="the --runs-dir of the sweep (every results.json below it is read)")
    coll.add_argument("--output", default="img/figure1.png", help="PNG to write (default %(default)s)")
    args = parser.parse_args(argv)

    if args.command == "run":
        where = (lambda path: Path(path).resolve()) if args.execute else str  # commands run in the repository
        for folder, command in sweep(where(args.data_root), where(args.runs_dir), args.launcher):
            print(shlex.join(command), flush=True)
            if args.execute and not (folder / "results.json").is_file():
                status = subprocess.run(command, cwd=REPO_ROOT).returncode
                if status:
                    raise DataError(f"the run into {folder} failed with status {status}")
        return None
    runs_dir = Path(args.runs_dir)
    if Path(args.output).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ConfigError(f"--output {args.output}: expected a .png (or .jpg) file")
    if Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output}: a folder; expected the path of a PNG file")
    if not runs_dir.is_dir():
        raise DataError(f"{runs_dir}: not found (expected the --runs-dir of the sweep)")
    rows = collect(runs_dir)
    if not rows:
        raise DataError(f"{runs_dir}: no results.json found below it")
    for line in doubts(rows):
        print(f"warning: {line}", file=sys.stderr)
    shots, params = curves(rows)
    write_text_atomic(runs_dir / "figure1.json", json.dumps({"runs": rows, "shots": shots, "params_m": params},
                                                            indent=1) + "\n")
    draw(shots, params, args.output)
    print(table(shots, params))
    print(f"written: {runs_dir / 'figure1.json'}, {args.output}")
    return rows


if __name__ == "__main__":
    run_cli(main)
