"""Compare evaluation runs: the folders the evaluator writes (metrics.json, per_image.csv, wsol_curves.json), and
training runs' folders (their final test, results.json, with a note on the config.yaml settings they differ in).

Prints one table of every metric of every run ('-' where a run lacks it) and writes to ``--output-dir``:
``compare.json`` (the table, per-class GT-known Loc, per-image counts), ``compare.png`` (GT-known Loc per
map threshold, wsol box accuracy per map threshold, the PxAP curve, GT-known Loc per class, as far as the
runs hold them) and, for the first run against each other one, ``per_image_<A>_vs_<B>.csv``: the images
both evaluated on which they differ in GT-known or Top-1 Loc. Runs that evaluated different images are
compared per image on the images they share. An --output-dir holding a comparison is refused unless
--overwrite.

    python tools/compare.py output/eval_sat output/eval_other --output-dir output/compare
"""
import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DataLoader.demo import DEFAULT_DEMO_ROOT  # noqa: E402
from DataLoader.eval_views import default_resize_size  # noqa: E402
from utils.config import (RESUMED_LINE, OneLineParser, current_keys, read_yaml_mapping, run_started_in,  # noqa: E402
                          show_value)
from utils.errors import ConfigError, DataError, run_cli, writing_outputs  # noqa: E402
from utils.outputs import FolderLock, Staged, finite_or_none, previous_outputs, read_json  # noqa: E402
from utils.visualize import bar_panel, line_panel, save_rgb, stack_panels  # noqa: E402

# metrics.json keys not in the table: settings of the model and inputs, the threshold lists (their results
# are the <metric>@<threshold> rows) and per_class (a table of its own)
NOT_TABULATED = ("num_spatial_blocks", "num_classes", "img_size", "resize_size", "search_thresholds", "thresholds",
                 "per_class", "training_config")
PER_THRESHOLD = "_per_threshold"
PER_IMAGE_FLAGS = ("gt_known", "top1_loc")
DATA_KEYS = ("data_format", "data_root", "metadata_root", "split")  # metrics.json: the data a run evaluated
SAT_SETTINGS = ("img_size", "resize_size", "tencrop", "threshold")  # what the sat protocol's numbers depend on
# config.yaml keys of training runs not named when they differ: where a run wrote and ran, and its data (said
# with the data note)
NOT_SETTINGS = ("output_dir", "device", "workers", "log_every", "cache_images", "data_root", "metadata_root",
                "val_boxes")
MAX_CLASSES_DRAWN = 40


class Run:
    """One evaluator output folder: its metrics, and its per-image rows and wsol curves when written; or a training
    run's folder: its final test (results.json) and its settings (config.yaml, ``config``; None for an evaluator's
    folder)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: not found (expected an evaluator output folder with metrics.json)")
        self.curves, self.rows, self.config, self.resumed = {}, None, None, []
        if not (self.folder / "metrics.json").is_file() and (self.folder / "results.json").is_file():
            self.metrics, self.config = training_record(self.folder)
            self.resumed = resumed_changes(self.folder / "config.yaml")
            return
        if not (self.folder / "metrics.json").is_file() and (self.folder / "metrics.jsonl").is_file():
            raise DataError(f"{self.folder}: a training run without results.json (its final test): the run has not "
                            "finished, or stopped before it (its log.txt says why)")
        self.metrics = _read_json(self.folder / "metrics.json", "an evaluator output folder")
        trained = self.metrics.get("training_config")  # the checkpoint's (none in the official release files)
        self.config = current_keys(trained) if isinstance(trained, dict) else None
        curves = self.folder / "wsol_curves.json"
        self.curves = _read_json(curves, "the evaluator's wsol curves") if curves.is_file() else {}
        per_image = self.folder / "per_image.csv"
        self.rows = read_per_image(per_image) if per_image.is_file() else None


def training_record(folder):
    """(metrics, config) of a training run's folder: the final test of results.json with the data and the sat view
    its config.yaml names (the keys the notes compare across runs, as an evaluator's metrics.json holds them)."""
    results = _read_json(folder / "results.json", "a training run's final test")
    if not (folder / "config.yaml").is_file():
        raise DataError(f"{folder}: results.json without config.yaml (a training run's folder holds both)")
    config = read_yaml_mapping(folder / "config.yaml")
    config = current_keys(config)  # an earlier version's keys under their names now
    results = _current_results(results)
    img_size = config.get("img_size")
    data = {key: config.get(key) for key in ("data_format", "data_root", "metadata_root")}
    if data["data_root"] is None and data["data_format"] == "cub":  # the built-in demo data (train.py reads it)
        data["data_root"] = str(DEFAULT_DEMO_ROOT)
    started_in = run_started_in(folder, config.get("output_dir"))
    data.update({key: os.path.abspath(os.path.join(started_in, data[key]))
                 for key in ("data_root", "metadata_root") if data[key]})
    model = {key: config[key] for key in ("arch", "num_spatial_blocks") if key in config}  # (the header's)
    return {**results, **model, **data, "img_size": img_size,
            "resize_size": config.get("resize_size") or (img_size and default_resize_size(img_size))}, config


def resumed_changes(config_path):
    """The lines train.py wrote at the top of a run's config.yaml for each resume that changed settings, without
    their '# ' ('resumed after 1 epoch(s), trained with the values before: area_thr 0.25 -> 0.3'): the file holds
    the values after the change, which not all of the run's epochs trained with."""
    text = config_path.read_text(encoding="utf-8", errors="replace")
    return [line[2:].strip() for line in text.splitlines() if line.startswith(RESUMED_LINE)]


def _current_results(results):
    """An earlier version's results.json in this version's form: without ``threshold``, its numbers were at its
    ``best_threshold`` (the best of the thresholds on the test split); a ``best_threshold`` that is a record holds
    the numbers of ``at_best_threshold`` and the threshold; without ``eval_protocol``, it reported the sat protocol."""
    results = dict(results)
    best = results.get("best_threshold")
    if isinstance(best, dict):
        best = dict(best)
        results["best_threshold"] = best.pop("threshold", None)
        results.setdefault("at_best_threshold", best)
    elif "threshold" not in results and isinstance(best, (int, float)):
        results["threshold"] = best
    if "eval_protocol" not in results and "gt_known_loc" in results:  # the sat protocol's numbers alone
        results["eval_protocol"] = "sat"
    return results


def _read_json(path, what):
    if not path.is_file():
        raise DataError(f"{path.parent}: no {path.name} (expected {what})")
    return read_json(path)


def read_per_image(path):
    """{image_id: row} of a per_image.csv, with the GT-known and Top-1 Loc flags as booleans (None where the
    cell is empty: not evaluated, e.g. Top-1 Loc of saved maps scored without predictions)."""
    try:
        return _per_image_rows(path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (expected the evaluator's per_image.csv)") from None


def _per_image_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("image_id",) + PER_IMAGE_FLAGS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = {}
        for lineno, row in enumerate(reader, start=2):
            for flag in PER_IMAGE_FLAGS:
                if row[flag] not in ("0", "1", ""):
                    raise DataError(f"{path} line {lineno}: {flag} must be 0, 1 or empty, got {row[flag]!r}")
                row[flag] = None if row[flag] == "" else row[flag] == "1"
            rows[row["image_id"]] = row
    return rows


def metric_rows(metrics, prefix=""):
    """(name, value) of every numeric result in a metrics.json record: nested keys joined with '.', and
    each ``<metric>_per_threshold`` list as ``<metric>@<threshold>`` rows by rising threshold."""
    out = []
    for key, value in metrics.items():
        if key in NOT_TABULATED and not prefix:
            continue
        if isinstance(value, dict):
            out += metric_rows(value, f"{prefix}{key}.")
        elif key.endswith(PER_THRESHOLD) and isinstance(value, list) and not prefix:
            base = key[:-len(PER_THRESHOLD)]
            out += [(f"{base}@{t:g}", v) for t, v in sorted(zip(metrics.get("thresholds", []), value))]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((prefix + key, value))
    return out


def metric_table(runs):
    """{metric: {run name: value or None}}, metrics in the order they first appear, the ``<metric>@<t>`` rows
    of all runs together by rising threshold."""
    table, groups = {}, {}
    for name, run in runs.items():
        for metric, value in metric_rows(run.metrics):
            table.setdefault(metric, {})[name] = value
            groups.setdefault(metric.split("@")[0], len(groups))

    def order(metric):
        base, _, threshold = metric.partition("@")
        return groups[base], float(threshold or 0)
    return {metric: {name: table[metric].get(name) for name in runs} for metric in sorted(table, key=order)}


def _cell(metric, value):
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if "threshold" in metric.rsplit(".", 1)[-1]:
        return f"{value:g}"
    return f"{value:.2f}"


def format_table(table, names):
    width = max([len("metric")] + [len(metric) for metric in table])
    columns = [max(9, len(name)) for name in names]
    lines = [f"{'metric':<{width}}" + "".join(f"  {name:>{w}}" for name, w in zip(names, columns))]
    lines += [f"{metric:<{width}}" + "".join(f"  {_cell(metric, values[name]):>{w}}" for name, w in zip(names, columns))
              for metric, values in table.items()]
    return "\n".join(lines)


def per_image_comparison(a, b):
    """Counts of images both runs evaluated where one is right and the other wrong, per flag both runs hold,
    how many images each run alone holds, and the shared images on which the runs differ."""
    shared = [image_id for image_id in a if image_id in b]
    flags = [flag for flag in PER_IMAGE_FLAGS if all(a[i][flag] is not None and b[i][flag] is not None
                                                     for i in shared)]
    counts = {flag: {"a_only": sum(a[i][flag] and not b[i][flag] for i in shared),
                     "b_only": sum(b[i][flag] and not a[i][flag] for i in shared),
                     "both": sum(a[i][flag] and b[i][flag] for i in shared),
                     "neither": sum(not a[i][flag] and not b[i][flag] for i in shared)} for flag in flags}
    differing = [i for i in shared if any(a[i][flag] != b[i][flag] for flag in flags)]
    return {"shared": len(shared), "only_in_a": len(a) - len(shared), "only_in_b": len(b) - len(shared),
            **counts}, differing


def write_differing(path, a, b, names, differing):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "label"] + [f"{flag}_{name}" for flag in PER_IMAGE_FLAGS for name in names]
                        + [f"iou_{name}" for name in names])
        for image_id in differing:
            writer.writerow([image_id, a[image_id].get("label", "")]
                            + ["" if rows[image_id][flag] is None else int(rows[image_id][flag])
                               for flag in PER_IMAGE_FLAGS for rows in (a, b)]
                            + [rows[image_id].get("iou", "") for rows in (a, b)])


def per_class_table(runs):
    """{class: {run name: GT-known Loc or None}} over the classes of every run holding per_class."""
    table = {}
    for name, run in runs.items():
        for cls, values in (run.metrics.get("per_class") or {}).items():
            table.setdefault(cls, {})[name] = values.get("gt_known_loc")
    return {cls: {name: values.get(name) for name in runs} for cls, values in table.items()}


def figure_panels(runs, per_class):
    """The panels of compare.png: curves first, then the per-class bars (rows of panels)."""
    curves = []
    sat = {name: sorted(zip(run.metrics["thresholds"], run.metrics["gt_known_loc_per_threshold"]))
           for name, run in runs.items() if len(run.metrics.get("gt_known_loc_per_threshold", [])) > 1}
    if sat:
        curves.append(line_panel("GT-known Loc (%) vs map threshold",
                                 {name: tuple(zip(*points)) for name, points in sat.items()},
                                 (0, 1), (0, 100)))
    boxes = {name: (run.curves["box_accuracy"]["cam_thresholds"], run.curves["box_accuracy"]["boxacc"])
             for name, run in runs.items() if "box_accuracy" in run.curves}
    if boxes:
        curves.append(line_panel("wsol: box accuracy (%, largest box, IoU 50) vs map threshold", boxes, (0, 1),
                                 (0, 100)))
    pr = {}
    for name, run in runs.items():
        if "pxap" in run.curves:
            points = [(r, p) for r, p in zip(run.curves["pxap"]["recall"], run.curves["pxap"]["precision"])
                      if p is not None]
            pr[name] = tuple(zip(*points)) if points else ((), ())
    if pr:
        curves.append(line_panel("wsol: PxAP precision vs recall", pr, (0, 1), (0, 1)))
    rows = [curves] if curves else []
    if per_class:
        names = list(runs)
        classes = list(per_class)
        title = "GT-known Loc (%) per class"
        if len(classes) > MAX_CLASSES_DRAWN:
            def spread(cls):
                values = [v for v in per_class[cls].values() if v is not None]
                return max(values) - min(values) if values else 0.0
            keep = set(sorted(classes, key=spread, reverse=True)[:MAX_CLASSES_DRAWN])
            classes = [cls for cls in classes if cls in keep]
            title += f": the {MAX_CLASSES_DRAWN} of {len(per_class)} classes where the runs differ most"
        rows.append([bar_panel(title, classes, {name: [per_class[cls][name] for cls in classes] for name in names},
                               (0, 100))])
    return rows


def run_names(folders, names):
    """The runs' names: --names, else the folders' names (their paths where two share a name)."""
    given = names is not None
    if given:
        if len(names) != len(folders):
            raise ConfigError(f"--names: expected {len(folders)} names (one per run, in order), got {len(names)}")
    else:
        names = [Path(f).name or str(f) for f in folders]
        if len(set(names)) < len(names):
            names = [str(f) for f in folders]
    if len(set(names)) < len(names):
        raise ConfigError("--names: the runs' names must differ" if given else
                          "a run folder is given twice: give --names that differ")
    return names


def _file_part(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _differing_path(output_dir, first, other, used):
    """``per_image_<A>_vs_<B>.csv``: each name cut to 100 characters (a file name has 255 bytes, its partial
    name included), numbered where two pairs of names give one file (names differing only in characters
    _file_part replaces: 'a b', 'a_b'); ``used``: the stems taken."""
    stem = f"per_image_{_file_part(first)[:100]}_vs_{_file_part(other)[:100]}"
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return output_dir / f"{name}.csv"


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="evaluator output folders or training run folders "
                                                                "(the first is the baseline of the per-image "
                                                                "comparison of evaluator folders)")
    parser.add_argument("--names", nargs="+", help="the runs' names in the table (default: the folders' names)")
    parser.add_argument("--output-dir", default="output/compare", help="default: output/compare")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the comparison --output-dir holds (compare.json, compare.png, the per-image "
                             "CSVs); without it such a folder is refused")
    args = parser.parse_args(argv)

    names = run_names(args.runs, args.names)
    runs = {name: Run(folder) for name, folder in zip(names, args.runs)}  # first: a missing run is the error to say
    output_dir = Path(args.output_dir)
    written = ["compare.json", "compare.png", *sorted(p.name for p in output_dir.glob("per_image_*_vs_*.csv"))]
    previous = previous_outputs(output_dir, written, args.overwrite, "comparison")
    staged = Staged()  # the new files, moved in place of the previous comparison's once all are written
    with FolderLock(output_dir, "tools/compare.py"), writing_outputs(output_dir):  # one line for a full disk
        try:
            record = compare(runs, output_dir, staged)
            staged.commit(output_dir, previous)
        except BaseException:
            staged.discard()
            raise
    return record


def setting_notes(runs):
    """What makes the runs' numbers not like for like: different image counts, data, or settings of the sat
    protocol (its view and reported map threshold, among the runs that evaluated it)."""
    notes = []
    counted = {name: run.metrics.get("num_images") for name, run in runs.items()}
    if len(set(counted.values())) > 1:
        each = ", ".join(f"{name} {count}" for name, count in counted.items())
        notes.append(f"the runs evaluated different numbers of images ({each}): their metrics are over different "
                     "image sets")
    keys = [key for key in DATA_KEYS if all(key in run.metrics for run in runs.values())]
    read = {name: " ".join(str(run.metrics[key]) for key in keys if run.metrics[key] is not None)  # (unset: left out)
            for name, run in runs.items()}
    if len(set(read.values())) > 1:
        each = "; ".join(f"{name}: {data}" for name, data in read.items())
        notes.append(f"the runs read different data ({each}); images are matched by id in the per-image comparisons")
    trained = {name: run.config for name, run in runs.items() if run.config is not None}
    keys = sorted({key for config in trained.values() for key in config} - set(NOT_SETTINGS))
    differ = [key for key in keys if len({json.dumps(config.get(key)) for config in trained.values()}) > 1]
    if len(trained) > 1 and differ:
        values = {key: ", ".join(f"{name} {show_value(config.get(key))}" for name, config in trained.items())
                  for key in differ}  # (null, true: as config.yaml spells them)
        each = "; ".join(f"{key} ({values[key]})" for key in differ)
        notes.append(f"the runs were trained with different settings (their config.yaml or checkpoint): {each}")
    for name, run in runs.items():  # config.yaml's values are the last resume's, not those of every epoch
        if run.resumed:
            notes.append(f"{name} was {'; then '.join(run.resumed)} (config.yaml holds the values after the change)")
    sat = {name: run for name, run in runs.items() if run.metrics.get("eval_protocol") in ("sat", "both")}
    keys = [key for key in SAT_SETTINGS if all(key in run.metrics for run in sat.values())]
    # a run of saved maps (--maps) takes its classes from --predictions, whatever view made them: its
    # tencrop (false: it runs no forward) is no setting of its numbers, so it differs from no other run's
    applies = {name: [key for key in keys if not (key == "tencrop" and run.metrics.get("maps"))]
               for name, run in sat.items()}
    differ = any(len({run.metrics[key] for name, run in sat.items() if key in applies[name]}) > 1 for key in keys)
    used = {name: ", ".join(f"{key} {run.metrics[key]}" for key in applies[name]) for name, run in sat.items()}
    if differ:
        each = "; ".join(f"{name}: {settings}" for name, settings in used.items())
        notes.append(f"the runs' sat numbers come from different settings ({each}): not like for like (the view "
                     "of saved maps: their views.json, e.g. make_baseline_maps --img-size / --resize-size; the map "
                     "threshold: --threshold)")
    return notes


def compare(runs, output_dir, staged):
    """Print the comparison of ``runs`` ({name: Run}, the first the baseline) and write it into ``output_dir``
    (each file at ``staged``'s partial name: utils/outputs.Staged); returns the record of compare.json."""
    names = list(runs)
    for name, run in runs.items():
        meta = [f"{key} {run.metrics[key]}" for key in ("checkpoint", "arch", "num_spatial_blocks", "split",
                                                         "eval_protocol") if key in run.metrics]
        print(f"{name}: {run.folder}" + (f" ({', '.join(meta)})" if meta else ""))
    table = metric_table(runs)
    print("\n" + format_table(table, names))
    notes = setting_notes(runs)
    for note in notes:
        print(note)

    comparisons = {}
    first, *others = names
    used = set()  # the per-image files' names
    for other in others:
        a, b = runs[first].rows, runs[other].rows
        if a is None or b is None:
            lacking = " and ".join(name for name, rows in ((first, a), (other, b)) if rows is None)
            trained = any(runs[name].config is not None for name in (first, other))
            how = "; of a training run: evaluator.py --checkpoint <run>/checkpoints/best.pth writes it" if trained \
                else ""
            print(f"\n{first} vs {other}: no per-image comparison ({lacking}: no per_image.csv{how})")
            continue
        counts, differing = per_image_comparison(a, b)
        if not counts["shared"] or not any(flag in counts for flag in PER_IMAGE_FLAGS):
            why = "no image evaluated by both" if not counts["shared"] else \
                f"neither {' nor '.join(PER_IMAGE_FLAGS)} scored by both: a wsol-only run has neither"
            print(f"\n{first} vs {other}: no per-image comparison ({why})")
            comparisons[f"{first} vs {other}"] = {**counts, "differing": None}
            continue
        path = _differing_path(output_dir, first, other, used)
        with writing_outputs(path):  # (a full disk's error names no file)
            write_differing(staged.path(path), a, b, (first, other), differing)
        comparisons[f"{first} vs {other}"] = {**counts, "differing": str(path)}
        left_out = (f" ({counts['only_in_a']} images only in {first} and {counts['only_in_b']} only in {other} "
                    "left out)" if counts["only_in_a"] or counts["only_in_b"] else "")
        print(f"\n{first} vs {other}, per image on the {counts['shared']} images both evaluated{left_out}:")
        for flag in (flag for flag in PER_IMAGE_FLAGS if flag in counts):
            c = counts[flag]
            print(f"  {flag}: {first} right and {other} wrong {c['a_only']}, {other} right and {first} wrong "
                  f"{c['b_only']} (both right {c['both']}, both wrong {c['neither']})")
        print(f"  the {len(differing)} differing images: {path}")

    per_class = per_class_table(runs)
    record = {"runs": {name: str(run.folder) for name, run in runs.items()},
              "metrics": {metric: {name: finite_or_none(value) for name, value in values.items()}
                          for metric, values in table.items()},
              "per_class_gt_known_loc": per_class, "per_image": comparisons, "notes": notes}
    staged.write_json(output_dir / "compare.json", record, indent=1)
    rows = figure_panels(runs, per_class)
    if rows:
        save_rgb(staged.path(output_dir / "compare.png"), stack_panels(rows))
    figure = f" and {output_dir / 'compare.png'}" if rows else ""
    print(f"\ncomparison written to {output_dir / 'compare.json'}{figure}")
    return record


if __name__ == "__main__":
    run_cli(main)
