"""The tables of tools/gpu_check.sh (the input pipeline and evaluation where users run them, against their
targets) and tools/gpu_record.sh (the one-GPU record: CUB_fast.yaml end to end, the ImageNet-sized rate,
fast vs official accuracy), read from what their runs left in one folder.

    python tools/gpu_table.py env --device cuda > RUNS/env.json      # the machine, at the start of a check;
                                                                     # exit 2 if requirements are not met
    python tools/gpu_table.py check RUNS [--output FILE.md]          # markdown table; FILE.json alongside
    python tools/gpu_table.py record RUNS [--output FILE.md]

What each run leaves (names under RUNS): ``<name>.json`` the stdout of tools/benchmark.py (its last JSON
line); ``<name>/`` the --output-dir of train.py (metrics.jsonl, results.json) or evaluator.py (log.txt);
``<name>/wall_s`` seconds from process start to exit; ``pytest.txt`` the suite's output. A run that is missing
or failed shows as "not run", and its row as not met.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional


# ------------------------------------------------------------------------------------------- readers
def text_lines(path):
    """The lines of a run's text file (undecodable bytes replaced), or None without the file."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None


def last_json(path):
    """The last line of ``path`` that parses as a JSON object, or None."""
    for line in reversed(text_lines(path) or []):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def epoch_records(run_dir):
    """The metrics.jsonl records of a train.py run, skipping a line cut short ([] without the file)."""
    records = []
    try:
        for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    except OSError:
        return []
    return records


def last_epoch(run_dir):
    """The metrics.jsonl record of a train.py run's last epoch, or None."""
    records = epoch_records(run_dir)
    return max(records, key=lambda r: r.get("epoch", 0)) if records else None


def train_rates(run_dir, first_epoch=2):
    """train_images_per_sec of every epoch from ``first_epoch`` (the first decodes into the cache, compiles)."""
    return [r["train_images_per_sec"] for r in epoch_records(run_dir) if r.get("epoch", 0) >= first_epoch]


def time_split(run_dir, wall):
    """Where a train.py run's ``wall`` seconds went: training (the epochs' train_time), the selection
    evaluations (test_time / val_time), the final test (its 'evaluated ... in X s' line) and the rest
    (start-up, data check, checkpoints, exit), as text; '' without metrics.jsonl."""
    records = epoch_records(run_dir)
    if not records:
        return ""
    train = sum(r.get("train_time", 0) for r in records)
    evals = [r[key] for r in records for key in ("test_time", "val_time") if key in r]
    final = evaluator_rate(run_dir)
    final = final[1] if final else 0.0
    parts = [f"training {train:.0f} s", f"{len(evals)} evaluation{'s' * (len(evals) != 1)} {sum(evals):.0f} s",
             f"final test {final:.0f} s", f"the rest {wall - train - sum(evals) - final:.0f} s"]
    return ", ".join(parts)


EVALUATED = re.compile(r"evaluated (\d+) images in ([\d.]+) s \(([\d.]+) images/s")


def evaluator_rate(run_dir):
    """(images, seconds, images/s) of an evaluator.py run, from the line its log ends the evaluation with."""
    for name in ("log.txt", "stdout.txt"):
        try:
            found = EVALUATED.findall((Path(run_dir) / name).read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
        if found:  # the logged rate: its seconds are rounded to 0.1 s
            images, seconds, rate = found[-1]
            return int(images), float(seconds), float(rate)
    return None


def wall_seconds(run_dir):
    try:
        return float((Path(run_dir) / "wall_s").read_text().strip())
    except (OSError, ValueError):
        return None


def results(run_dir):
    try:
        return json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")
# one line per test with -v: "[gw0] [ 10%] PASSED tests/..." (pytest-xdist) or "tests/... PASSED [ 10%]"
PYTEST_OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+)|^(tests/\S+) "
                            r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def _outcomes(lines):
    """(outcome, test id) of each per-test line."""
    for line in lines:
        m = PYTEST_OUTCOME.search(line)
        if m:
            yield (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))


def pytest_counts(path):
    """{'passed': n, 'failed': n, ...} from pytest's final summary line; without one (the suite was stopped),
    the per-test lines of ``pytest -v`` counted so far, with 'stopped': True. None when neither is there."""
    lines = text_lines(path) or []
    for line in reversed(lines):
        found = PYTEST_COUNTS.findall(line)
        if found and " in " in line and line[:1] in "=0123456789":  # not a test id holding such words
            counts = {}
            for n, word in found:
                key = "errors" if word.startswith("error") else word
                counts[key] = counts.get(key, 0) + int(n)
            return counts
    keys = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped", "XFAIL": "xfailed",
            "XPASS": "xpassed"}
    counts = {}
    for outcome, _ in _outcomes(lines):
        counts[keys[outcome]] = counts.get(keys[outcome], 0) + 1
    return {**counts, "stopped": True} if counts else None


def pytest_failures(path):
    """The ids of the tests that failed or errored, in the order pytest reported them."""
    return list(dict.fromkeys(test for outcome, test in _outcomes(text_lines(path) or [])
                              if outcome in ("FAILED", "ERROR")))


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One line of a table: what was measured, its value, a ratio to what it is compared with, the
    target and whether it is met ('yes', 'no', 'not run', or '' for a reference row)."""
    what: str
    value: str
    ratio: str = ""
    target: str = ""
    met: str = ""
    number: Optional[float] = None


def fmt(x):
    """A rate or count: whole numbers, one decimal below 100."""
    return f"{x:,.1f}" if abs(x) < 100 and x != int(x) else f"{x:,.0f}"


def verdict(ok):
    return "yes" if ok else "no"


def at_least(ratio, target):
    """A ratio shown with two decimals meets ``target`` as shown (0.897 is shown, and counted, as 0.90)."""
    return round(ratio, 2) >= target


def not_run(what, target=""):
    return Row(what, "not run", "", target, "not run" if target else "")


def step_rows(runs):
    """The training step alone (fp32, bf16): the references of the train.py rows."""
    rows, rates = [], {}
    for name, label in (("step_fp32", "fp32"), ("step_bf16", "bf16 (`--amp`)")):
        out = last_json(runs / f"{name}.json")
        what = f"training step alone, {label}, in-memory batches"
        if not out:
            rows.append(not_run(what))
            continue
        rates[name] = out["images_per_second"]
        what += f", batch {out['batch_size']}"
        ratio = f"{out['images_per_second'] / rates['step_fp32']:.2f}x fp32" \
            if name == "step_bf16" and "step_fp32" in rates else ""
        rows.append(Row(what, f"{fmt(out['images_per_second'])} img/s ({out['peak_memory_mb'] / 1024:.1f} GB)",
                        ratio, number=out["images_per_second"]))
    return rows, rates


# #21's target for each end-to-end rate against the rate of its part alone (step, data loading, forward)
RATIO_TARGET = 0.9


def train_row(runs, name, what, step_rate, step_name, target=RATIO_TARGET):
    """A train.py run's last epoch against the step alone: >= ``target`` of it."""
    goal = f">= {target:.2f} of the {step_name} step"
    record = last_epoch(runs / name)
    if not record or "train_images_per_sec" not in record:
        return not_run(what, goal)
    rate = record["train_images_per_sec"]
    what = f"{what}, epoch {record['epoch']}"
    wait = record.get("train_data_wait", 0) / max(record.get("train_time", 0), 1e-9)
    value = f"{fmt(rate)} img/s ({100 * wait:.0f}% waiting for data)"
    if not step_rate:
        return Row(what, value, "no step rate", goal, "not run", rate)
    ratio = rate / step_rate
    return Row(what, value, f"{ratio:.2f} of the {step_name} step", goal, verdict(at_least(ratio, target)), rate)


def eval_vs_data_row(runs, name, what, target=RATIO_TARGET):
    """tools/benchmark.py --mode eval --data-root: end to end against loading alone."""
    goal = f">= {target:.2f} of data-only"
    out = last_json(runs / f"{name}.json")
    if not out:
        return not_run(what, goal)
    ratio = out["end_to_end_vs_data"]
    return Row(f"{what}, batch {out['batch_size']}, {out['workers']} workers",
               f"{fmt(out['images_per_second'])} img/s (data only {fmt(out['data_images_per_second'])})",
               f"{ratio:.2f} of data-only", goal, verdict(at_least(ratio, target)), out["images_per_second"])


def eval_vs_forward_row(runs, name, what, target=RATIO_TARGET):
    """tools/benchmark.py --mode eval: the evaluation rate against the model's forward alone."""
    goal = f">= {target:.2f} of forward-only"
    out = last_json(runs / f"{name}.json")
    if not out:
        return not_run(what, goal)
    # from files: the end-to-end rate (benchmark's eval_vs_forward takes its in-memory step there)
    ratio = out["images_per_second"] / out["forward_images_per_second"]
    return Row(f"{what}, batch {out['batch_size']}", f"{fmt(out['images_per_second'])} img/s "
               f"(forward only {fmt(out['forward_images_per_second'])})", f"{ratio:.2f} of forward-only", goal,
               verdict(at_least(ratio, target)), out["images_per_second"])


def evaluator_row(runs, name, what, min_rate=None):
    """An evaluator.py run: its logged rate over the whole split (loading and boxes included) and its wall time."""
    goal = f">= {fmt(min_rate)} img/s" if min_rate else ""
    found = evaluator_rate(runs / name)
    if not found:
        return not_run(what, goal)
    images, seconds, rate = found
    wall = wall_seconds(runs / name)
    ratio = f"process start to exit {wall:.1f} s" if wall is not None else ""
    return Row(f"{what}, {fmt(images)} images", f"{fmt(rate)} img/s ({seconds:.1f} s)", ratio, goal,
               verdict(rate >= min_rate) if min_rate else "", rate)


SUITE = "test suite, CUDA present"


def suite_row(runs):
    counts = pytest_counts(runs / "pytest.txt")
    if counts is None:
        return not_run(SUITE, "no failures")
    stopped = counts.pop("stopped", False)
    failed = counts.get("failed", 0) + counts.get("errors", 0)
    value = ", ".join(f"{n} {key}" for key, n in counts.items())
    failures = pytest_failures(runs / "pytest.txt")
    named = [f"failed: {', '.join(failures[:4])}" + (" ..." if len(failures) > 4 else "")] if failures else []
    ratio = "; ".join(["stopped at its time limit: counts so far"] * stopped + named)
    met = "no" if failed else ("not run" if stopped else verdict(bool(counts.get("passed", 0))))
    return Row(SUITE, value, ratio, "no failures", met)


def check_rows(runs):
    runs = Path(runs)
    rows, steps = step_rows(runs)
    fp32, bf16 = steps.get("step_fp32"), steps.get("step_bf16")
    rows += [
        train_row(runs, "train_pil_fp32", "`train.py`, PIL decoding in the workers (default), fp32", fp32, "fp32"),
        train_row(runs, "train_cache_bf16", "`train.py --cache-images --amp`", bf16, "bf16"),
        train_row(runs, "train_gpu_decode_bf16", "`train.py --gpu-decode --amp`", bf16, "bf16"),
        eval_vs_data_row(runs, "eval_centre", "evaluation, centre crop, PIL, end to end (`benchmark --data-root`)"),
        eval_vs_data_row(runs, "eval_gpu_decode", "evaluation, centre crop, `--gpu-decode`, end to end "
                                                  "(`benchmark --data-root`)"),
        eval_vs_forward_row(runs, "eval_tencrop", "evaluation, ten-crop, PIL, end to end (`benchmark --data-root`)"),
        eval_vs_forward_row(runs, "eval_memory", "evaluation, in-memory batches, boxes included (`benchmark`)"),
        evaluator_row(runs, "evaluator_centre", "`evaluator.py`, centre crop, PIL", 1300),
        evaluator_row(runs, "evaluator_gpu_decode", "`evaluator.py --gpu-decode`, centre crop", 2500),
        evaluator_row(runs, "evaluator_tencrop", "`evaluator.py --tencrop`, PIL", 300),
        suite_row(runs),
    ]
    return rows


def record_time_row(runs, name, what, seconds=120):
    goal = f"< {seconds} s"
    wall, res = wall_seconds(runs / name), results(runs / name)
    if wall is None or res is None:
        return not_run(what, goal)
    rates = train_rates(runs / name)
    ratio = "; ".join(([f"epochs 2+: median {fmt(statistics.median(rates))} img/s"] if rates else [])
                      + [part for part in [time_split(runs / name, wall)] if part])
    return Row(what, f"{wall:.0f} s to results.json", ratio, goal, verdict(wall < seconds), wall)


def sustained_row(runs, name, what, rate=2200):
    goal = f">= {fmt(rate)} img/s"
    record = last_epoch(runs / name)
    if not record or "train_images_per_sec" not in record:
        return not_run(what, goal)
    value = record["train_images_per_sec"]
    images = record.get("train_images")
    wait = record.get("train_data_wait", 0) / max(record.get("train_time", 0), 1e-9)
    return Row(f"{what}{f', {fmt(images)} files' if images else ''}",
               f"{fmt(value)} img/s ({100 * wait:.0f}% waiting for data)", "", goal, verdict(value >= rate), value)


def accuracy_rows(runs):
    """Fast against official recipe, seeds acc_<recipe>_s<seed>: the fast recipe's mean within the official
    recipe's seed spread (its lowest to its highest seed), for GT-known Loc and Top-1 Cls; with the differences
    of the seeds both ran (fast - official), which tell more where the seeds' spread is wide."""
    found = {"official": {}, "fast": {}}
    for path in sorted(Path(runs).glob("acc_*_s*")):
        match = re.fullmatch(r"acc_(official|fast)_s(\d+)", path.name)
        res = results(path)
        if match and res:
            found[match.group(1)][int(match.group(2))] = res
    rows = []
    for key, label in (("gt_known_loc", "GT-known Loc"), ("top1_cls", "Top-1 Cls")):
        what = f"accuracy, {label}: fast recipe (bf16) vs official (fp32)"
        goal = "fast mean within the official seeds' range"
        if len(found["official"]) < 2 or not found["fast"]:
            rows.append(not_run(what, goal))
            continue
        official = [res[key] for _, res in sorted(found["official"].items())]
        fast = [res[key] for _, res in sorted(found["fast"].items())]
        mean = statistics.mean(fast)
        low, high = min(official), max(official)
        differences = [found["fast"][seed][key] - found["official"][seed][key]
                       for seed in sorted(found["fast"].keys() & found["official"].keys())]
        paired = (f"; same seed, fast - official: mean {statistics.mean(differences):+.2f} "
                  f"({', '.join(f'{d:+.2f}' for d in differences)})") if differences else ""
        rows.append(Row(f"{what}, seeds {', '.join(map(str, sorted(found['fast'])))}",
                        f"fast mean {mean:.2f} ({', '.join(f'{v:.2f}' for v in fast)})",
                        f"official {low:.2f}-{high:.2f} ({', '.join(f'{v:.2f}' for v in official)}){paired}", goal,
                        verdict(low <= mean <= high), mean))
    return rows


def record_rows(runs):
    runs = Path(runs)
    rows = [record_time_row(runs, "cub_fast", "full CUB recipe, `CUB_fast.yaml`, process start to results.json")]
    if (runs / "cub_fast_compile").exists():  # gpu_record.sh --compile-time
        rows.append(record_time_row(runs, "cub_fast_compile", "the same with `--compile`"))
    official = Path(runs) / "cub_official"
    if official.exists():
        rows.append(record_time_row(runs, "cub_official", "the same with `CUB.yaml` (official recipe)", 10**6))
        rows[-1].target, rows[-1].met = "", ""
    rows += [sustained_row(runs, "imagenet_pil_bf16", "ImageNet-sized sustained training rate, PIL, bf16"),
             sustained_row(runs, "imagenet_gpu_decode_bf16", "ImageNet-sized sustained training rate, "
                                                             "`--gpu-decode`, bf16")]
    return rows + accuracy_rows(runs)


# ---------------------------------------------------------------------------------------------- output
def unmet_requirements(path=Path(__file__).resolve().parents[1] / "requirements.txt", only=None):
    """What this Python lacks of ``path`` ("timm 0.9.16 (needs >=1.0.23,<2)"; ``only``: of those names): a GPU
    machine comes with its own packages, and a check run on a missing or too old one would fail in every run."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        from packaging.requirements import Requirement
    except ImportError:  # neither a requirement nor a dependency of torch: a venv of torch alone has pip's copy
        from pip._vendor.packaging.requirements import Requirement
    unmet = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if only is not None and req.name not in only:
            continue
        try:
            found = version(req.name)
        except PackageNotFoundError:
            unmet.append(f"{req.name} missing (needs {req.specifier or 'any version'})")
            continue
        if not req.specifier.contains(found, prereleases=True):
            unmet.append(f"{req.name} {found} (needs {req.specifier})")
    return unmet


def environment(device):
    """The machine and versions, for the table's header. Torch is imported for a CUDA device only (its version
    then names the CUDA build): a check that stops at unmet requirements stops at once."""
    from importlib.metadata import PackageNotFoundError, version
    versions = {}
    for name in ("torch", "torchvision", "timm"):  # read without importing them (seconds each)
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    for module in ("cv2", "PIL"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    card = f"no GPU: {platform.processor() or platform.machine()} CPU"
    if device == "cuda":
        import torch
        versions["torch"] = torch.__version__
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        card = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
            card += f", driver {driver}"
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device, "card": card, "cores": cores, **versions}


def markdown(title, env, rows, note=""):
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "torchvision", "timm", "cv2", "PIL") if env.get(k))
    lines = [f"### {title}", "", f"{env.get('date', '?')}, {env.get('card', '?')}, {env.get('cores', '?')} CPU cores, "
             f"{versions}.{(' ' + note) if note else ''}", "",
             "| what | measured | ratio | target | met |", "| :-- | --: | :-- | :-- | :-- |"]
    lines += [f"| {r.what} | {r.value} | {r.ratio} | {r.target} | {r.met} |" for r in rows]
    return "\n".join(lines) + "\n"


TITLES = {"check": "GPU check: the input pipeline and evaluation where users run them",
          "record": "One-GPU record: `config/CUB_fast.yaml`"}


def _write_atomic(path, text):
    """``text`` into ``path`` whole or not at all (a kill leaves the previous file): a temporary file renamed.
    (utils.outputs.write_text_atomic's rule; this tool runs before the project's requirements are checked, so it
    imports nothing of the project.)"""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:  # (a full disk: no half-written temporary file left beside the table)
        tmp.unlink(missing_ok=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("env", "check", "record"),
                   help="env: the machine as JSON; check / record: the table of tools/gpu_check.sh / gpu_record.sh")
    p.add_argument("runs", nargs="?", help="the folder the runs wrote into")
    p.add_argument("--device", default="cuda", help="env: the device measured (default %(default)s)")
    p.add_argument("--output", help="also write the table to this file (and the rows as JSON next to it)")
    p.add_argument("--note", default="", help="a sentence added under the title (sizes, mode)")
    p.add_argument("--quick", action="store_true", help="the runs of --quick: no target is met or missed")
    p.add_argument("--final", action="store_true", help="exit 1 when no row was measured (the end of a script)")
    p.add_argument("--tests", action="store_true", help="env: the test suite runs too (pytest is required)")
    args = p.parse_args(argv)
    if args.kind == "env":
        print(json.dumps(environment(args.device)))
        unmet = unmet_requirements()
        if args.tests:  # (the suite would be "not run" only at the end, after the data and the runs)
            unmet += [f"{line} for the test suite (requirements-dev.txt; or --no-tests)" for line in
                      unmet_requirements(Path(__file__).resolve().parents[1] / "requirements-dev.txt", ("pytest",))]
        if unmet:
            python = f"{sys.version_info.major}.{sys.version_info.minor}"  # (compiled wheels are made per version)
            raise SystemExit("error: requirements are not met: " + "; ".join(unmet) + ". Carry wheels of "
                             f"these (pip download --no-deps --only-binary :all: --python-version {python} "
                             "NAME==VERSION -d DIR) and pass --wheels DIR")
        if args.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise SystemExit(f"error: --device cuda, but torch {torch.__version__} sees no CUDA GPU: run this "
                                 "on a GPU machine, or with --device cpu --quick to try the runs and the table")
        return None
    if not args.runs:
        p.exit(2, f"error: {args.kind} needs the runs folder (the folder the runs of tools/gpu_{args.kind}.sh wrote "
                  "into)\n")
    runs = Path(args.runs)
    if not runs.is_dir():  # (a table of "not run" rows would say the runs failed)
        p.exit(2, f"error: {runs}: {'not a folder' if runs.exists() else 'not found'} (expected the folder the "
                  f"runs of tools/gpu_{args.kind}.sh wrote into)\n")
    env = last_json(runs / "env.json") or {}
    rows = check_rows(runs) if args.kind == "check" else record_rows(runs)
    if args.quick:  # the plumbing on tiny sizes: no target can be met or missed
        for row in rows:
            if row.met in ("yes", "no"):
                row.met = "n/a (--quick)"
    table = markdown(TITLES[args.kind], env, rows, args.note)
    print(table)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(out.with_suffix(".json"), json.dumps({"env": env, "note": args.note,
                                                            "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
        _write_atomic(out, table)
    if args.final and all(row.value == "not run" for row in rows if row.what != SUITE):
        raise SystemExit(f"error: no row was measured: every run failed (their output: {runs}/*/stdout.txt, "
                         f"{runs}/*.err)")
    return rows


if __name__ == "__main__":
    main()
