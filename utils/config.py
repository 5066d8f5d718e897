"""The config keys of training and evaluation, one schema: built-in defaults < config file < flags.

Every key of :data:`FIELDS` is a config-file key and a flag (``eval_batch_size`` <-> ``--eval-batch-size``;
booleans also take ``--no-<flag>``). Its section says which scripts read it from a config file: the training
scripts read every section but ``evaluator``; the evaluators read data, evaluation, test and evaluator keys,
and take the model from the checkpoint and the run's settings (output folder, device, precision, workers)
from their own command line. ``python -m utils.config --markdown`` writes the reference, docs/config.md.
"""
import argparse
import dataclasses
import difflib
import math
import os
import re
import sys
from pathlib import Path

import yaml

from utils.distributed import cpu_share, said_by_main
from utils.errors import ConfigError, writing_outputs
from utils.outputs import write_text_atomic
from utils.metrics import TRAIN_THRESHOLDS, on_grid
from utils.optim import SCHEDULES, trainable_blocks

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
TRAINERS = ("train", "train_imagenet")
EVALUATORS = ("evaluate", "evaluate_imagenet")
BOTH = TRAINERS + EVALUATORS
NOT_IMAGENET_EVAL = TRAINERS + ("evaluate",)  # evaluator_ImageNet.py always reads the ILSVRC2012 layout

SECTIONS = {
    "model": "The network. The evaluators take it from the checkpoint; --resize-size on their command line "
             "overrides the checkpoint's setting, and --arch, never needed, must name the architecture the file "
             "holds.",
    "optimisation": "How training updates the weights.",
    "data": "What is read and how.",
    "evaluation": "The evaluations during training (model selection) and the evaluators' forward passes.",
    "test": "The reported numbers: train.py's final test of best.pth (results.json) and the evaluators' "
            "metrics.json.",
    "run": "Settings of one job, not of the experiment: flags of each script; only the training scripts read "
           "them from a config file (an evaluator given a training config must not write into its run folder).",
    "evaluator": "Keys of evaluator.py and evaluator_ImageNet.py only; the training scripts ignore them.",
}
FILE_SECTIONS = {"train": tuple(s for s in SECTIONS if s != "evaluator"),
                 "evaluate": ("data", "evaluation", "test", "evaluator")}


@dataclasses.dataclass(frozen=True)
class Script:
    """A script's file name, --help description and the config file of its defaults."""
    file: str
    description: str
    defaults: str


SCRIPTS = {
    "train": Script("train.py", "Train SAT on CUB-200-2011 or other WSOL data (the synthetic demo without "
                                "--data-root).\n\n"
                                "    python train.py                        # the demo: config/demo.yaml, on a CPU\n"
                                "    python train.py --config config/CUB.yaml --data-root /data/CUB_200_2011 "
                                "--output-dir output/cub", "CUB.yaml"),
    "train_imagenet": Script("train_ImageNet.py", "Train SAT on ImageNet (ILSVRC2012).\n\n"
                                                  "    torchrun --nproc_per_node 8 train_ImageNet.py --config "
                                                  "config/ILSVRC.yaml --data-root /data/ILSVRC2012 --output-dir "
                                                  "output/imagenet", "ILSVRC.yaml"),
    "evaluate": Script("evaluator.py", "Evaluate a SAT checkpoint (or with --maps any method's saved maps) on "
                                       "CUB-200-2011, another dataset format or a folder dataset; without "
                                       "--data-root on the demo data.\n\n"
                                       "    python evaluator.py --checkpoint output/demo/checkpoints/best.pth "
                                       "--output-dir output/eval_demo   # after the demo\n"
                                       "    python evaluator.py --data-root /data/CUB_200_2011 --checkpoint "
                                       "best_loc.pth.tar --output-dir output/eval_cub", "CUB.yaml"),
    "evaluate_imagenet": Script("evaluator_ImageNet.py", "Evaluate a SAT checkpoint on the ILSVRC2012 validation "
                                                         "set.\n\n"
                                                         "    python evaluator_ImageNet.py --data-root "
                                                         "/data/ILSVRC2012 --checkpoint best_loc.pth.tar "
                                                         "--output-dir output/eval_imagenet", "ILSVRC.yaml"),
}
DEMO_CONFIG = "demo.yaml"  # train.py without --config and --data-root
EVALUATOR_BATCH = 32  # the evaluators' eval_batch_size when it is null (no training micro-batch to follow)
EVALUATOR_WORKERS = 4  # the evaluators' workers: at most this, and at most the process's share of the CPUs
EVALUATOR_OUTPUT = "output/eval"  # the evaluators' output_dir
_SAME = object()


class Field:
    """One config key: section, default, kind, description (help) and the values it accepts.

    kind: 'int', 'float', 'str', 'bool', 'floats' (a list), 'amp' (true, false or auto), 'pretrained' (true,
    false or a file). ``domain``: '>= 1', '> 0', '[0, 1]', '(0, 1)' ... ``words``: names an 'int' key also
    takes. ``rule``: (test, what it asks in words) for what the kind and domain do not say. ``scripts``: those
    that take it (default: by section). ``evaluator_default``: the evaluators' own.
    """

    def __init__(self, section, default, kind, help, *, domain=None, choices=None, words=(), nullable=False,
                 rule=None, path=False, scripts=None, evaluator_default=_SAME):
        self.section, self.default, self.kind, self.help = section, default, kind, help
        self.domain, self.choices, self.words, self.nullable = domain, choices, words, nullable
        self.rule, self.path = rule, path
        self.scripts = scripts or (EVALUATORS if section == "evaluator" else TRAINERS)
        self.evaluator_default = default if evaluator_default is _SAME else evaluator_default

    def expected(self):
        """What the key accepts, in words."""
        if self.choices:
            text = "one of " + ", ".join(self.choices)
        else:
            text = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                    "floats": "a list of numbers", "amp": "true, false or auto",
                    "pretrained": "true, false or a file path"}[self.kind]
            if self.domain:
                text += (" in " if self.domain[0] in "[(" else " ") + self.domain
        if self.rule:
            text = self.rule[1] if self.kind == "str" else f"{text} ({self.rule[1]})"
        if self.words:
            text = ", ".join(self.words) + " or " + text
        return text + (" or null" if self.nullable else "")

    def check(self, value):
        """``value`` as read from YAML, checked (ints are accepted for floats); ValueError if it does not fit.
        A word means what it means as a flag's text (:meth:`parse`): null or none (any case) for a nullable key;
        for the true/false keys, amp and pretrained, a quoted or differently cased true/false/auto (yes/no,
        on/off, 1/0)."""
        if isinstance(value, str) and self.nullable and value.lower() in ("none", "null"):
            return None
        if self.kind in ("bool", "amp", "pretrained") and (isinstance(value, str)
                                                            or type(value) is int and value in (0, 1)):
            try:
                value = {"bool": _bool, "amp": _amp, "pretrained": _pretrained}[self.kind](str(value))
            except ValueError:
                raise ValueError(self.expected()) from None
        if (value is None and self.nullable) or value in self.words:
            return value
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {"int": isinstance(value, int) and not isinstance(value, bool), "float": number,
              "str": isinstance(value, str), "bool": isinstance(value, bool),
              "floats": isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in value),
              "amp": isinstance(value, bool) or value == "auto",
              "pretrained": isinstance(value, (bool, str))}[self.kind]
        numbers = value if self.kind == "floats" else [value] if self.kind in ("int", "float") else []
        if not ok or (self.choices and value not in self.choices) or not all(_within(v, self.domain) for v in numbers) \
                or not all(math.isfinite(v) for v in numbers) or (self.rule and not self.rule[0](value)):
            raise ValueError(self.expected())
        if self.kind == "float":
            return float(value)
        if self.path and isinstance(value, str):  # ~ as the shell would (a config file, or --flag=~/...)
            return os.path.expanduser(value)
        return [float(v) for v in value] if self.kind == "floats" else value

    def parse(self, text):
        """A flag's text as a value of this key (argparse type); for 'floats', one element."""
        if self.nullable and text.lower() in ("none", "null"):
            return None
        if text in self.words:
            return text
        try:
            value = {"int": int, "float": float, "str": str, "floats": float, "amp": _amp,
                     "pretrained": _pretrained}[self.kind](text)
            return self.check([value])[0] if self.kind == "floats" else self.check(value)
        except ValueError:
            expected = self.expected()
            if self.kind == "floats":  # one element: what each number must be
                expected = "numbers" + expected.removeprefix("a list of numbers").split(" (")[0]
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _parses(parse, value):
    """Whether ``parse(value)`` accepts ``value`` (raises no ConfigError)."""
    try:
        parse(value)
    except ConfigError:
        return False
    return True


def _within(value, domain):
    if domain is None:
        return True
    if domain[0] in "[(":
        low, high = (float(bound) for bound in domain[1:-1].split(","))
        return (low <= value if domain[0] == "[" else low < value) and (value <= high if domain[-1] == "]"
                                                                       else value < high)
    op, bound = domain.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def _bool(text):
    """A flag's true/false word (any case): those YAML reads as booleans (true, yes, on; false, no, off) and 1, 0."""
    value = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}.get(str(text).lower())
    if value is None:
        raise ValueError(text)
    return value


def _amp(text):
    return "auto" if text.lower() == "auto" else _bool(text)


def _pretrained(text):
    try:
        return _bool(text)
    except ValueError:
        return text


FIELDS = {
    # model
    "arch": Field("model", "deit_sat_small_patch16_224", "str", "model architecture (Model.list_archs()); the "
                  "evaluators: the one the checkpoint records, else read off its weights' shapes (--arch: only "
                  "one the file fits)",
                  scripts=BOTH, evaluator_default=None),
    "pretrained": Field("model", True, "pretrained", "initial weights: true = DeiT ImageNet-1k via timm, false = "
                        "random, or a weights file", path=True),
    "img_size": Field("model", 224, "int", "input crop size (a multiple of the patch size 16)", domain=">= 16",
                      rule=(lambda size: size % 16 == 0, "a multiple of 16")),
    "resize_size": Field("model", None, "int", "resize before cropping (null: round(img_size * 256 / 224)); the "
                         "evaluators: the checkpoint's training setting", domain=">= 1", nullable=True,
                         scripts=BOTH),
    "drop_path": Field("model", 0.1, "float", "stochastic depth rate", domain="[0, 1)"),
    "num_spatial_blocks": Field("model", 3, "int", "number of final spatial-aware blocks", domain=">= 1"),
    "attn_impl": Field("model", "fused", "str", "attention implementation", choices=("fused", "naive")),
    "area_thr": Field("model", 0.25, "float", "area prior of the batch area loss (the paper's lambda)",
                      domain="(0, 1)"),
    "area_loss_scope": Field("model", "global", "int", "images the batch area loss averages over: global = one "
                             "micro-batch of every process; process = each process's own micro-batch; N = groups of "
                             "N images of the processes' micro-batches in rank order, one term per group, averaged",
                             domain=">= 1", words=("global", "process")),
    "area_loss_weight": Field("model", 1.0, "float", "weight of the batch area loss in the total loss (official: 1; "
                              "0 trains without it: an ablation of the loss terms)", domain=">= 0"),
    "norm_loss_weight": Field("model", 1.0, "float", "weight of the normalization loss in the total loss (official: "
                              "1; 0 trains without it)", domain=">= 0"),
    # optimisation
    "epochs": Field("optimisation", 30, "int", "training epochs", domain=">= 1"),
    "batch_size": Field("optimisation", 256, "int", "GLOBAL batch of one optimizer step: each process loads "
                        "batch_size / (processes x accum_steps) images per micro-batch (must divide exactly)",
                        domain=">= 1"),
    "accum_steps": Field("optimisation", 1, "int", "micro-batches per optimizer step (gradient accumulation, their "
                         "gradients averaged); each micro-batch has its own batch area loss, so K > 1 changes that "
                         "loss; images per epoch are unchanged", domain=">= 1"),
    "lr": Field("optimisation", 1e-4, "float", "AdamW learning rate", domain="> 0"),
    "min_lr": Field("optimisation", 1e-6, "float", "final learning rate of the cosine schedule", domain=">= 0"),
    "weight_decay": Field("optimisation", 0.05, "float", "AdamW weight decay (never on 1-D parameters and biases)",
                          domain=">= 0"),
    "decay_tokens": Field("optimisation", True, "bool", "weight decay also on cls_token, loc_token, pos_embed, "
                          "loc_embed (false exempts them, as DeiT does)"),
    "lr_schedule": Field("optimisation", "constant", "str", "learning-rate schedule after the warm-up",
                         choices=SCHEDULES),
    "warmup_epochs": Field("optimisation", 0.0, "float", "linear warm-up epochs (either schedule)", domain=">= 0"),
    "clip_grad": Field("optimisation", None, "float", "clip the gradient norm to this value", domain="> 0",
                       nullable=True),
    "trainable": Field("optimisation", "all", "str", "parameters to train: all, sat (spatial token and its embedding "
                       "+ spatial-aware blocks + final norm + head), head, or last:K (the same with the last K "
                       "blocks)", rule=(lambda which: _parses(trainable_blocks, which), "all, sat, head or last:K")),
    # data
    "data_format": Field("data", "cub", "str", "dataset format (train_ImageNet.py and evaluator_ImageNet.py read "
                         "only imagenet)",
                         choices=("cub", "imagenet", "wsol", "folder", "dogs", "cars", "aircraft"),
                         scripts=NOT_IMAGENET_EVAL),
    "data_root": Field("data", None, "str", "dataset root (null: the synthetic demo dataset, which evaluator.py "
                       "reads only for a checkpoint trained on it; train_ImageNet.py and evaluator_ImageNet.py need "
                       "one)", nullable=True, scripts=BOTH, path=True),
    "metadata_root": Field("data", None, "str", "wsolevaluation metadata folder (<split>/image_ids.txt ...)",
                           nullable=True, scripts=NOT_IMAGENET_EVAL, path=True),
    "val_boxes": Field("data", None, "str", "ImageNet val boxes (XML folder, LOC_val_solution.csv or val_gt.txt; "
                       "null: looked for under data_root) or the folder format's boxes CSV (null: "
                       "<data_root>/boxes.csv)", nullable=True, scripts=BOTH, path=True),
    "val_split": Field("data", False, "bool", "select the model (best.pth) on the held-out 'val' split "
                       "(wsolevaluation train-fullsup, or a folder dataset's val/) instead of test; the final test "
                       "keeps its fixed threshold"),
    "images_per_class": Field("data", None, "int", "few-shot: train on N images per class", domain=">= 1",
                              nullable=True),
    "drop_last": Field("data", False, "bool", "drop each epoch's last partial training batch (with accum_steps, "
                       "the images of its last partial optimizer step)"),
    "check_train_split": Field("data", False, "bool", "also check every training image before the first step (the "
                               "evaluation splits always are; bad ones are then skipped, or an error with "
                               "strict_data)"),
    "strict_data": Field("data", False, "bool", "stop at an unreadable training image instead of skipping it with "
                         "a warning"),
    "gpu_decode": Field("data", False, "bool", "decode JPEGs (batched nvJPEG on CUDA) and resize on the device "
                        "instead of PIL in the workers; pixels differ slightly from PIL's", scripts=BOTH),
    # evaluation
    "eval_thresholds": Field("evaluation", list(TRAIN_THRESHOLDS), "floats", "map thresholds searched at each "
                             "evaluation during training", domain="[0, 1]", rule=(bool, "at least one")),
    "eval_start_epoch": Field("evaluation", 26, "int", "the epochs (1-based) evaluated for model selection start "
                              "here; the last epoch is always evaluated", domain=">= 1"),
    "eval_every": Field("evaluation", 1, "int", "from eval_start_epoch on, evaluate the epochs whose number is "
                        "a multiple of N (and the last)", domain=">= 1"),
    "eval_batch_size": Field("evaluation", None, "int", "images per evaluation batch per process (null: train.py "
                             f"the training micro-batch, the evaluators {EVALUATOR_BATCH}); on a CPU, the forward "
                             "takes a batch in parts of a few images", domain=">= 1",
                             nullable=True, scripts=BOTH),
    "eval_protocol": Field("evaluation", "auto", "str", "sat = the sat protocol (Top-1 / Top-5 / GT-known Loc, "
                           "needs boxes), wsol = the wsol protocol (MaxBoxAcc / MaxBoxAccV2 with boxes, PxAP with "
                           "masks), both, cls = classification only; auto = from the data (boxes: sat, masks "
                           "only: wsol, neither: cls), logged", choices=("auto", "sat", "wsol", "both", "cls"),
                           scripts=BOTH),
    "selection_metric": Field("evaluation", "loc", "str", "metric choosing best.pth, the first epoch reaching its "
                              "maximum: loc = Top-1 Loc + GT-known Loc, top1_loc, gt_known_loc, top1_cls, "
                              "maxboxaccv2 or pxap; one the evaluation does not produce falls back (logged) to "
                              "the protocol's first: loc, maxboxaccv2 or pxap, top1_cls",
                              choices=("loc", "top1_loc", "gt_known_loc", "top1_cls", "maxboxaccv2", "pxap")),
    # test
    "threshold": Field("test", 0.4, "float", "map threshold of the reported sat-protocol numbers", domain="[0, 1]",
                       scripts=BOTH),
    "tencrop": Field("test", True, "bool", "ten-crop classification in the reported numbers (sat protocol)",
                     scripts=BOTH),
    "report_best_threshold": Field("test", False, "bool", "results.json also gets best_threshold, the best of "
                                   "eval_thresholds chosen on the test split itself, and the test metrics at it "
                                   "under at_best_threshold (scored in the same test pass)"),
    "overlays": Field("test", 0, "int", "draw the overlays (map, boxes) of the first N images in dataset order "
                      "into <output_dir>/overlays/; 0: none, all: every image", domain=">= 0", words=("all",),
                      scripts=BOTH),
    # run
    "output_dir": Field("run", "output/run", "str", "folder of the outputs: checkpoints, logs, metrics, results "
                        f"(the config files set their own, e.g. output/cub; the evaluators: {EVALUATOR_OUTPUT})",
                        scripts=BOTH, evaluator_default=EVALUATOR_OUTPUT, path=True),
    "seed": Field("run", 6, "int", "random seed (each process adds its rank)", domain="[0, 4294967295]"),
    "device": Field("run", "auto", "str", "auto = CUDA when available", choices=("auto", "cuda", "cpu"),
                    scripts=BOTH),
    "amp": Field("run", False, "amp", "mixed precision: false = fp32; true = bf16 autocast (CUDA: fp16 + grad "
                 "scaler on GPUs without bf16; CPU: needs native bf16); auto = true where supported, else fp32. "
                 "train.py's final test is always fp32", scripts=BOTH),
    "workers": Field("run", 8, "int", f"data loading processes per process (the evaluators: {EVALUATOR_WORKERS}, at "
                     "most the process's share of the CPUs)", domain=">= 0", scripts=BOTH,
                     evaluator_default=min(EVALUATOR_WORKERS, cpu_share())),
    "cache_images": Field("run", False, "bool", "keep each split's decoded, resized images in "
                          "<output_dir>/image_cache (filled during the first epoch; later epochs skip decoding); "
                          "removed when the run finishes"),
    "compile": Field("run", False, "bool", "torch.compile the model for its full batches (other sizes run eagerly; "
                     "the evaluators: their forwards, whose size on a CPU is a part of a batch)", scripts=BOTH),
    "save_every_steps": Field("run", None, "int", "also write last.pth every N optimizer steps, with the position "
                              "in the epoch (--resume then continues mid-epoch); null: at each epoch's end only",
                              domain=">= 1", nullable=True),
    "log_every": Field("run", 20, "int", "read the losses back (one host sync) and log every N optimizer steps",
                       domain=">= 1"),
    # evaluator
    "checkpoint": Field("evaluator", None, "str", "checkpoint of this project or an official SAT release file",
                        nullable=True, path=True),
    "maps": Field("evaluator", None, "str", "evaluate saved localization maps of any method instead of a "
                  "checkpoint (docs/evaluation.md)", nullable=True, path=True),
    "predictions": Field("evaluator", None, "str", "with --maps: CSV of each image's top-5 classes (columns image_id, "
                         "top5; an evaluator's per_image.csv is one) for Top-1 / Top-5 Loc and Cls (a column top1 "
                         "instead: Top-1 only); null: GT-known Loc and the wsol metrics only", nullable=True,
                         path=True),
    "overlay_blocks": Field("evaluator", False, "bool", "overlays also show each spatial-aware block's map and box "
                            "beside the fused one (the paper's visualization; with --checkpoint)"),
    "allow_constant_maps": Field("evaluator", False, "bool", "with --maps: score a constant map (all zeros once "
                                 "normalised, as wsolevaluation scores it) instead of stopping at it"),
    "num_classes": Field("evaluator", None, "int", "classes of the model (null: read off the head's shape)",
                         domain=">= 1", nullable=True),
    "split": Field("evaluator", "test", "str", "split to evaluate: test, or val (wsolevaluation train-fullsup, or "
                   "a folder dataset's val/)",
                   choices=("test", "val"), scripts=("evaluate",)),
    "thresholds": Field("evaluator", [], "floats", "map thresholds searched on the evaluated split: the best (GT-known "
                        "+ Top-1 Loc) is reported under best_threshold, never as the headline", domain="[0, 1]"),
    "wsol_threshold": Field("evaluator", None, "float", "wsol protocol: also report box accuracy (mask data: "
                            "the pixel IoU) at this map threshold (e.g. a maxboxacc_threshold or piou_threshold "
                            "chosen on a val split) and draw overlays at it (null: at MaxBoxAcc's, or piou_threshold)",
                            domain="[0, 0.99]", nullable=True,
                            rule=(on_grid, "one of wsolevaluation's map thresholds 0, 0.01, ..., 0.99")),
    "save_maps": Field("evaluator", None, "str", "write each image's maps: the raw sat map as "
                       "DIR/sat/<image_id>.npy, the wsol map (224 x 224, in [0, 1]) as DIR/wsol/<image_id>.npy",
                       nullable=True, path=True),
    "save_boxes": Field("evaluator", None, "str", "write the sat protocol's boxes of the whole split (at threshold, "
                        "original pixels) as a COCO-format detection FILE (file_name: the image id)", nullable=True,
                        path=True),
    "box_processes": Field("evaluator", None, "int", "extract boxes in N processes (0: a thread pool): same "
                           "numbers, scales with cores (null: on a GPU machine half of this process's share of the "
                           "CPUs, at most 8; else 0)", domain=">= 0", nullable=True),
}
METAVARS = {"area_loss_scope": "{global,process,N}", "save_maps": "DIR", "maps": "DIR", "predictions": "FILE",
            "save_boxes": "FILE", "checkpoint": "FILE", "overlays": "N|all",
            "threshold": "T", "thresholds": "T", "wsol_threshold": "T", "eval_thresholds": "T"}
# Keys and flags of earlier versions: (new key, what its value is now, why).
RENAMED = {
    "test_tencrop": ("tencrop", "", ""),
    "save_images": ("overlays", " N", " (overlays are written to <output-dir>/overlays/)"),
    "max_images": ("overlays", " N", " (overlays are written to <output-dir>/overlays/)"),
    "save_scoremaps": ("save_maps", " DIR", ""),
    "format": ("data_format", "", ""),
    "batch_size": ("eval_batch_size", " N", ""),  # the evaluators' --batch-size; training's batch_size stays
}


def current_keys(config):
    """An earlier version's recorded config (a run's config.yaml, a checkpoint's) with the keys renamed since under
    their names now (training's batch_size stays: RENAMED's is the evaluators' flag)."""
    return {RENAMED[key][0] if key in RENAMED and key not in FIELDS else key: value for key, value in config.items()}


def keys_of(script):
    """The keys ``script`` takes (as flags and, by section, from a config file)."""
    return [key for key, field in FIELDS.items() if script in field.scripts]


def _reads(script, key):
    """Whether ``script`` takes ``key`` from a config file: its section is one the script reads."""
    return key in keys_of(script) and FIELDS[key].section in FILE_SECTIONS[_kind(script)]


def _kind(script):
    return "train" if script in TRAINERS else "evaluate"


def defaults_of(script):
    """The built-in defaults of ``script``'s keys (its config file of defaults not applied)."""
    evaluator = script in EVALUATORS
    return {key: FIELDS[key].evaluator_default if evaluator else FIELDS[key].default for key in keys_of(script)}


# ------------------------------------------------------------------------------------------ files
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads numbers as YAML 1.2 does: ``1e-3`` is a float (YAML 1.1 wants ``1.0e-3``)."""


class DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping of a config file (PyYAML would keep the last silently)."""

    def __init__(self, key, mark):
        super().__init__(f"{key} given twice")
        self.problem, self.problem_mark = f"key {key} given twice", mark


def _mapping_once(loader, node, deep=False):
    """YAML mappings whose keys are each given once (merge keys ``<<`` and keys that are not plain values are
    left to PyYAML, which merges or reports them)."""
    seen = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise DuplicateKey(key, key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes the strings :class:`_Loader` reads as numbers (``1e-4``: a float there, an unquoted
    string to PyYAML's YAML 1.1 dumper), so that a saved config.yaml reads back as it was written."""


_FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
                        r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_once)
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def _error_line(err):
    """1-based line of a YAML error: where the unfinished key, quote or bracket starts (PyYAML notices it
    lines later), else where the parser stopped."""
    context = getattr(err, "context", None) or ""
    mark = getattr(err, "context_mark", None) if "block" not in context else None
    mark = mark or getattr(err, "problem_mark", None)
    return mark.line + 1 if mark else None


def read_yaml_mapping(path):
    """A YAML file's top-level mapping ({} for an empty file); ConfigError naming the file (and line)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: not readable ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        line = _error_line(err)
        where = f" line {line}" if line else ""
        raise ConfigError(f"config file {path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _unknown_key(key):
    """What a config file key that is not in FIELDS is: renamed (to what) or unknown (the nearest key)."""
    if key in RENAMED:
        new, _, why = RENAMED[key]
        return f"{key} was renamed: use {new}{why.replace('-', '_')}"
    close = difflib.get_close_matches(str(key), FIELDS, n=1)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]}?)" if close else "")


def load_yaml(path, _seen=(), sources=None):
    """The keys of a config file, checked, over those of its ``base:`` file (a path relative to it);
    unknown or renamed keys and wrong values raise ConfigError naming the file. ``sources``: a dict that
    receives the file each key was read from."""
    path = Path(path)
    data = read_yaml_mapping(path)
    values = {}
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"config file {path}: base must be a config file path, got {base!r}")
        base_path = path.parent / os.path.expanduser(base)
        if base_path.resolve() in _seen or base_path.resolve() == path.resolve():
            raise ConfigError(f"config file {path}: base {base} includes this file again")
        if not base_path.is_file():
            raise ConfigError(f"config file {path}: base {base}: {base_path} not found (a path relative to this file)")
        values = load_yaml(base_path, _seen + (path.resolve(),), sources)
    unknown = [_unknown_key(key) for key in data if key not in FIELDS]
    if unknown:  # all of them in the one line
        raise ConfigError(f"config file {path}: {'; '.join(unknown)}")
    for key, value in data.items():
        try:
            values[key] = FIELDS[key].check(value)
        except ValueError as err:
            raise ConfigError(f"config file {path}: {key} must be {err}, got {show_value(value)}") from None
        if sources is not None:
            sources[key] = str(path)
    return values


# ------------------------------------------------------------------------------------------ flags
class ExampleFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that a paragraph of lines indented by 4 spaces (example commands) is kept
    as written."""

    def _fill_text(self, text, width, indent):
        return "\n\n".join(indent + block.replace("\n", "\n" + indent) if block.startswith("    ")
                           else super(ExampleFormatter, self)._fill_text(block, width, indent)
                           for block in text.split("\n\n"))


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one ConfigError line naming the flag (``--help`` keeps the usage), and which
    reads ``--flag=~/x`` as ``--flag ~/x`` reaches it from a shell: with ``~`` the home folder."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else [str(arg) for arg in args]
        return super().parse_known_args([_home_after_equals(arg) for arg in args], namespace)

    def error(self, message):
        raise ConfigError(re.sub(r"^argument (--[\w-]+)(/--no-[\w-]+)?: ", r"\1: ", message))

    def parse_args(self, args=None, namespace=None):
        """As argparse's, with a word it does not know said as the training scripts and evaluators say it:
        'unknown flag --x (did you mean --y?)' or 'unexpected argument', not 'unrecognized arguments: ...'."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            flag = next((word.split("=", 1)[0] for word in extra if word.startswith("-")), None)
            if flag is None:
                raise ConfigError(f"unexpected argument {extra[0]!r}")
            parsers, others = [self], {}
            for action in self._actions:  # the flags of the subcommand given too; another one's are said as such
                if isinstance(action, argparse._SubParsersAction):
                    chosen = getattr(parsed, action.dest, None) if action.dest != argparse.SUPPRESS else None
                    for name, sub in action.choices.items():
                        if chosen in (None, name):
                            parsers.append(sub)
                        else:
                            others.update({option: name for option in sub._option_string_actions})
            taken = {option: option for parser in parsers for option in parser._option_string_actions
                     if option.startswith("--") and option != "--help"}
            if flag in others and flag not in taken:
                raise ConfigError(f"unknown flag {flag} for {chosen} (a flag of {others[flag]})")
            raise ConfigError(unknown_flag_line(flag, taken))
        return parsed


def _home_after_equals(word):
    """``--flag=~/x`` with the home folder for ``~`` (a shell expands ``~`` in ``--flag ~/x``, not after '=')."""
    flag, equals, value = word.partition("=")
    if word.startswith("--") and equals and value.startswith("~"):
        return f"{flag}={os.path.expanduser(value)}"
    return word


def at_least(least, kind=int):
    """An argparse type for the tools' flags: a number of ``kind`` (int or float) >= ``least``."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= least:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} >= {least}, "
                                             f"got {text!r}")
        return value
    return parse


def build_parser(script, defaults=None):
    """The flags of ``script``; ``defaults`` (shown in --help): :func:`script_defaults`."""
    spec, evaluator = SCRIPTS[script], script in EVALUATORS
    parser = OneLineParser(prog=spec.file, description=spec.description, argument_default=argparse.SUPPRESS,
                           formatter_class=ExampleFormatter,
                           allow_abbrev=False, epilog="Flags override the --config file, which overrides the "
                                                      "defaults (every key: docs/config.md).")
    if evaluator:
        parser.add_argument("--config", metavar="FILE", type=os.path.expanduser,
                            help="YAML file of config keys, e.g. a training config: "
                            f"its {', '.join(FILE_SECTIONS['evaluate'])} keys are read, the others ignored "
                            f"(defaults: config/{spec.defaults})")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace the evaluation an --output-dir holds (its metrics.json, per_image.csv, "
                                 "wsol curves and overlays, once the new evaluation is complete); without it "
                                 "such a folder is refused")
    else:
        parser.add_argument("--config", metavar="FILE", type=os.path.expanduser,
                            help="YAML file of config keys (default: with --resume, the "
                            "run's config.yaml; else " + (
                                f"config/{DEMO_CONFIG} without --data-root, config/{spec.defaults} with it)"
                                if script == "train" else f"config/{spec.defaults})"))
        parser.add_argument("--resume", nargs="?", const="auto", metavar="PATH", type=os.path.expanduser,
                            help="continue a run: from PATH, or from <output-dir>/checkpoints/last.pth when no PATH")
        parser.add_argument("--overwrite", action="store_true",
                            help="start again in an --output-dir that holds a previous run (its checkpoints, "
                                 "metrics, results, logs and images are deleted once the new run has its data, "
                                 "model and first batch); without it such a folder is refused")
        # torch.distributed.launch passes --local-rank (older versions --local_rank); torchrun sets LOCAL_RANK.
        parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    defaults = script_defaults(script) if defaults is None else defaults
    groups = {section: parser.add_argument_group(section, text) for section, text in SECTIONS.items()
              if any(FIELDS[key].section == section for key in defaults)}
    for key, default in defaults.items():
        field, flag = FIELDS[key], "--" + key.replace("_", "-")
        choices, group = field.choices, groups[field.section]
        if key == "data_format" and script != "train":  # evaluator.py refuses imagenet; train_ImageNet.py reads only it
            choices = ("imagenet",) if script == "train_imagenet" else tuple(c for c in choices if c != "imagenet")
            default = choices[0] if len(choices) == 1 else default
        text = field.help if default in (None, []) else f"{field.help} (default: {show_value(default)})"
        if script == "train" and key == "output_dir":  # without --config train.py reads a file that sets its own
            demo, cub = (_read(CONFIG_DIR / name, script)[0].get(key, default) for name in (DEMO_CONFIG, spec.defaults))
            text = f"{field.help} (default: {demo} without --data-root, {cub} with it; {default} under a --config " \
                   "that sets none, nor its base)"
        if field.kind == "bool":
            group.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, help=text)
        elif field.kind == "amp":
            group.add_argument(flag, dest=key, nargs="?", const=True, type=field.parse, metavar="{true,false,auto}",
                               help=text + "; --amp = true")
            group.add_argument("--no-" + flag[2:], dest=key, action="store_false", help="same as --amp false")
        else:
            metavar = "{" + ",".join(choices) + "}" if choices else \
                METAVARS.get(key, {"int": "N", "float": "X"}.get(field.kind, key.upper()))
            group.add_argument(flag, dest=key, type=field.parse, nargs="+" if field.kind == "floats" else None,
                               metavar=metavar, help=text)
    return parser


def _scripts_that_do(scripts):
    """'a.py does' / 'a.py and b.py do' / 'a.py, b.py and c.py do'."""
    names = f"{', '.join(scripts[:-1])}{' and ' if len(scripts) > 1 else ''}{scripts[-1]}"
    return f"{names} {'do' if len(scripts) > 1 else 'does'}"


def _unknown_flag(token, script, parser, argv=()):
    """The error line of a command-line word the parser does not know (``argv``: the command line it is in)."""
    flag = token.split("=", 1)[0]
    if not flag.startswith("-"):
        for before in (argv[k - 1] for k in range(1, len(argv)) if argv[k] == token):
            action = parser._option_string_actions.get(before)
            if action is not None and action.nargs == 0:  # a value after a true/false flag: --val-split true
                other = before.replace("--no-", "--", 1) if before.startswith("--no-") else "--no-" + before[2:]
                negated = (f" ({other} for {'true' if before.startswith('--no-') else 'false'})"
                           if isinstance(action, argparse.BooleanOptionalAction) else "")
                return f"{before} takes no value{negated}, got {token!r}"
        return f"unexpected argument {token!r}"
    name = flag.lstrip("-")
    negated, key = name.startswith("no-"), name.removeprefix("no-").replace("-", "_")
    spelt = "--" + ("no-" if negated else "") + key.replace("_", "-")  # the flag of that key, with dashes
    if flag != spelt and key in keys_of(script) and (not negated or FIELDS[key].kind == "bool"):
        return f"unknown flag {flag} (did you mean {spelt}?)"  # --data_root: the key's spelling, not its flag's
    if key in RENAMED and key not in keys_of(script):
        new, metavar, why = RENAMED[key]
        new_flag = "--" + ("no-" if negated else "") + new.replace("_", "-")
        if new not in keys_of(script):
            others = [SCRIPTS[s].file for s in FIELDS[new].scripts]
            return (f"{flag} was renamed {new_flag}, which {SCRIPTS[script].file} does not take "
                    f"({_scripts_that_do(others)})")
        return f"{flag} was renamed: use {new_flag}{'' if negated else metavar}{why}"
    if key in FIELDS and negated and FIELDS[key].kind != "bool" and key in keys_of(script):
        return f"unknown flag {flag} (--{key.replace('_', '-')} is not a true/false flag: give it a value)"
    if key in FIELDS:
        others = [SCRIPTS[s].file for s in FIELDS[key].scripts]
        return f"unknown flag {flag} ({SCRIPTS[script].file} does not take it; {_scripts_that_do(others)})"
    # what a flag (or a renamed one) stands for now
    meaning = {option: option for option in parser._option_string_actions if option.startswith("--")
               and option != "--help"}
    meaning.update({"--" + old.replace("_", "-"): "--" + new.replace("_", "-") for old, (new, _, _) in RENAMED.items()
                    if old not in keys_of(script)})
    return unknown_flag_line(flag, meaning)


def unknown_flag_line(flag, meaning):
    """'unknown flag --x (did you mean --y?)': ``meaning`` maps each flag taken (or an old name) to the flag it is
    now; one the unknown word begins is preferred, else the closest."""
    prefixed = [option for option in meaning if option.startswith(flag)]
    close = difflib.get_close_matches(flag, prefixed or meaning, n=1, cutoff=0 if prefixed else 0.6)
    return f"unknown flag {flag}" + (f" (did you mean {meaning[close[0]]}?)" if close else "")


# ---------------------------------------------------------------------------------------- resolve
def script_defaults(script):
    """``script``'s defaults: the built-in ones (the official CUB settings), and for the evaluators and
    train_ImageNet.py the keys of their config file of defaults (config/CUB.yaml, config/ILSVRC.yaml) that they
    read: a --config file without ``base:`` overrides those, and --help shows them."""
    values = defaults_of(script)
    if script in EVALUATORS or script == "train_imagenet":
        values.update(_read(CONFIG_DIR / SCRIPTS[script].defaults, script)[0])
    return values


def _read(path, script):
    """(values ``script`` reads from the config file, the keys it ignores, {key read: the file that gave it}:
    the file or its ``base:``)."""
    sources = {}
    values = load_yaml(path, sources=sources)
    read = {key: value for key, value in values.items() if _reads(script, key)}
    return read, [key for key in values if not _reads(script, key)], {key: sources[key] for key in read}


def _default_config(script, data_root):
    if script == "train" and data_root is None:
        return CONFIG_DIR / DEMO_CONFIG
    return CONFIG_DIR / SCRIPTS[script].defaults


def _run_config(cli, default_config, script, values):
    """The config.yaml of the run a --resume without --config continues (its --output-dir's, else that of the
    run whose checkpoint it names), so that it goes on with its own settings; None when there is none."""
    resume = cli.get("resume")
    if resume is None:
        return None
    run = resumed_run(resume)
    if run is not None and not cli.get("output_dir"):  # the run of the checkpoint named: it goes on in its folder
        return run / "config.yaml" if (run / "config.yaml").is_file() else None
    output_dir = cli.get("output_dir") or _read(default_config, script)[0].get("output_dir", values["output_dir"])
    candidates = [Path(output_dir) / "config.yaml", *([run / "config.yaml"] if run is not None else [])]
    return next((path for path in candidates if path.is_file()), None)


def run_started_in(folder, output_dir):
    """The folder train.py ran in, which the relative paths of its run ``folder``'s config.yaml are relative to:
    ``folder`` less its relative ``output_dir`` (they were read from that process's folder, whatever folder that
    was); else '.'."""
    folder, out = Path(folder).resolve(), Path(output_dir or ".")
    if not out.is_absolute() and folder.parts[len(folder.parts) - len(out.parts):] == out.parts:
        return str(folder.parents[len(out.parts) - 1]) if out.parts else str(folder)
    return "."


def _check_relative_paths(read, from_file, config, cli):
    """A relative path of a run's config.yaml (a --resume or --config of a run started in another folder) names a
    path from the folder the run was started in: refused in one line naming that folder when it is not found from
    here and is from there (the output folder is the run's own: read_config; pretrained weights are not read when
    a checkpoint is resumed)."""
    started = run_started_in(Path(config).parent, read.get("output_dir"))
    if started == "." or Path(started) == Path.cwd():
        return
    resumed = resume_file(cli.get("resume"), Path(config).parent)
    unread = {"output_dir", *(["pretrained"] if resumed and resumed.is_file() else [])}
    for key, value in read.items():
        if key not in unread and FIELDS[key].path and key not in cli and isinstance(value, str) and \
                not os.path.isabs(value) and not os.path.exists(value) and os.path.exists(os.path.join(started, value)):
            raise ConfigError(f"{key}: {value} (config file {from_file[key]}) is relative to {started}, where the "
                              f"run was started, and not found from this folder ({os.getcwd()}): run from {started}, "
                              f"or give --{key.replace('_', '-')} {os.path.join(started, value)}")


def resume_file(resume, output_dir):
    """The checkpoint a --resume continues from: ``<output_dir>/checkpoints/last.pth`` for a plain --resume
    ('auto'), else its PATH; None without --resume."""
    if resume is None:
        return None
    return Path(output_dir) / "checkpoints" / "last.pth" if resume == "auto" else Path(resume)


def resumed_run(resume):
    """The run folder of a --resume PATH naming a file of <run>/checkpoints/ (None otherwise: a plain --resume,
    another file)."""
    if resume in (None, "auto"):
        return None
    path = Path(resume).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else None


def parse_config(argv=None, script="train"):
    """:func:`read_config`; its error, the same in every process of a job (they read the same flags and files),
    is printed by the first process alone (utils.distributed.said_by_main)."""
    with said_by_main(os.environ.get("RANK", "0") == "0"):
        return read_config(argv, script)


def read_config(argv=None, script="train"):
    """The resolved configuration of ``script`` (train, train_imagenet, evaluate, evaluate_imagenet): defaults <
    config file < flags. The training scripts read ``--config`` or, without it, the resumed run's config.yaml
    (with --resume) or their config file of defaults (said on stdout); the evaluators read ``--config`` over
    theirs. Returns an ``argparse.Namespace`` of the script's keys plus ``config``, ``ignored_config_keys`` (keys
    of --config the script does not read),
    ``from_file`` ({key read from it: the file, --config or its base}), ``flags_given`` (the keys given as
    flags) and ``overwrite``, and for training ``resume`` and ``local_rank``."""
    values = script_defaults(script)
    parser = build_parser(script, values)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    cli, extra = parser.parse_known_args(argv)
    if extra:
        raise ConfigError(_unknown_flag(extra[0], script, parser, argv))
    cli = vars(cli)
    ignored, config, own = [], cli.get("config"), None
    if script in TRAINERS and config is None:
        config = _default_config(script, cli.get("data_root"))
        own = _run_config(cli, config, script, values)
        if os.environ.get("RANK", "0") == "0":
            print(f"no --config: using {own} (the resumed run's own)" if own else f"no --config: using "
                  f"config/{config.name}", flush=True)
        config = own or config
    read, from_file = {}, {}
    if config is not None:
        read, ignored, from_file = _read(config, script)
        values.update(read)
        _check_relative_paths(read, from_file, config, cli)
    if own is not None and own.parent == resumed_run(cli.get("resume")) and not cli.get("output_dir") and \
            Path(values["output_dir"]).resolve() != own.parent:  # (as recorded where it names the folder from here)
        values["output_dir"] = str(own.parent)  # its config.yaml may name it relative to where the run was started
    flags = [key for key in cli if key in values]
    values.update({key: cli[key] for key in flags})
    cfg = argparse.Namespace(**values, config=None if config is None else str(config), ignored_config_keys=ignored,
                             from_file=from_file, flags_given=frozenset(flags))
    cfg.overwrite = cli.get("overwrite", False)
    if script in TRAINERS:
        cfg.resume, cfg.local_rank = cli.get("resume"), cli.get("local_rank")
    elif cfg.eval_batch_size is None:
        cfg.eval_batch_size = EVALUATOR_BATCH
    validate(cfg, script)
    return cfg


def given_as(cfg, key):
    """Key ``key`` of ``cfg`` (:func:`read_config`'s) and its value as the user gave it: '--epochs 2' for a flag,
    'epochs: 30 (config file config/CUB.yaml)' or 'epochs: 30 (default)' otherwise; a whole float reads as the
    user wrote it, 3 rather than 3.0."""
    value = getattr(cfg, key)
    value = show_value(int(value) if isinstance(value, float) and value.is_integer() else value)
    if key in getattr(cfg, "flags_given", ()):
        return f"--{key.replace('_', '-')} {value}"
    from_file = getattr(cfg, "from_file", {})
    return f"{key}: {value} ({'config file ' + from_file[key] if key in from_file else 'default'})"


def validate(cfg, script):
    """Checks across keys (each key's own values are checked as it is read); ConfigError naming each key as it
    was given (:func:`given_as`)."""
    from Model.sat import ARCH_ARGS  # here, not at the top: Model imports utils.checkpoint, which imports this
    if getattr(cfg, "arch", None) is not None and cfg.arch not in ARCH_ARGS:
        raise ConfigError(f"unknown arch {cfg.arch!r} ({given_as(cfg, 'arch')}); known: "
                          f"{', '.join(sorted(ARCH_ARGS))}")
    if script in TRAINERS:
        depth = ARCH_ARGS[cfg.arch]["depth"]
        if cfg.num_spatial_blocks > depth:
            raise ConfigError(f"num_spatial_blocks must be in [1, {depth}] (the depth of {cfg.arch}): "
                              f"{given_as(cfg, 'num_spatial_blocks')}")
        blocks = trainable_blocks(cfg.trainable)  # refused when parsed, naming where it was given (it was said
        if blocks is not None and blocks > depth:  # once the data was read, as a flag even from a config file)
            raise ConfigError(f"trainable last:K must have K <= {depth} (the depth of {cfg.arch}): "
                              f"{given_as(cfg, 'trainable')}")
        if cfg.resume is not None and cfg.overwrite:
            raise ConfigError("--resume continues the run in --output-dir and --overwrite deletes it: choose one")
        if cfg.resume not in (None, "auto") and Path(cfg.resume).is_dir():  # (it was said once the data was read)
            raise ConfigError(f"--resume {cfg.resume}: a folder, not a checkpoint file; to continue the run it holds: "
                              f"--output-dir {cfg.resume} --resume (or --resume "
                              f"{Path(cfg.resume) / 'checkpoints' / 'last.pth'})")
        if cfg.resize_size is not None and cfg.resize_size < cfg.img_size:
            raise ConfigError(f"resize_size must be at least img_size: {given_as(cfg, 'resize_size')}, "
                              f"{given_as(cfg, 'img_size')}; give --resize-size N >= {cfg.img_size}, or "
                              "--resize-size null (the official 256/224 of img_size)")
        if script == "train_imagenet" and "data_format" in cfg.flags_given and cfg.data_format != "imagenet":
            raise ConfigError(f"--data-format {cfg.data_format}: train_ImageNet.py reads only the ImageNet layout "
                              f"(ILSVRC2012); train.py reads the other formats")
        return
    if cfg.checkpoint is None and cfg.maps is None:
        raise ConfigError("--checkpoint is required (on the command line or in --config), or --maps DIR")
    if cfg.checkpoint is not None and cfg.maps is not None:
        raise ConfigError("--checkpoint and --maps exclude each other: one is evaluated")
    if cfg.predictions is not None and cfg.maps is None:
        raise ConfigError("--predictions goes with --maps (a checkpoint predicts its own classes)")
    if cfg.save_maps is not None and cfg.maps is not None:
        raise ConfigError("--save-maps with --maps: the maps are saved already")
    if script == "evaluate_imagenet" and cfg.data_root is None:
        raise ConfigError("--data-root is required (the ILSVRC2012 folder with val/ and train/<wnid>/)")
    if script == "evaluate" and cfg.data_format == "imagenet":
        raise ConfigError("--data-format imagenet: use evaluator_ImageNet.py, which reads the ILSVRC2012 layout with "
                          "the official ImageNet settings (config/ILSVRC.yaml)")


def config_dict(cfg):
    """The config keys of ``cfg`` (what is saved and compared on resume)."""
    return {key: getattr(cfg, key) for key in FIELDS if hasattr(cfg, key)}


# Settings each node may have its own of: where it finds the files, and how it loads and computes
PER_NODE_KEYS = ("data_root", "metadata_root", "val_boxes", "output_dir", "pretrained", "device", "workers",
                 "cache_images", "compile", "gpu_decode", "attn_impl")


def job_settings(cfg):
    """The settings every process of a job must share (train.py checks them with utils/distributed's
    check_agreement): the config keys but PER_NODE_KEYS, and --resume / --overwrite (a process that starts
    afresh beside others that resume)."""
    settings = {key: value for key, value in config_dict(cfg).items() if key not in PER_NODE_KEYS}
    return {**settings, "resume": cfg.resume is not None, "overwrite": bool(getattr(cfg, "overwrite", False))}


RESUMED_LINE = "# resumed "


def save_config(cfg, path, resumed_line=None):
    """The resolved configuration as YAML (a run's config.yaml); an OSError is one OutputError line. The lines
    of resumes that changed settings (``resumed_line``, starting with RESUMED_LINE: the file holds the values
    now, what was trained before them used others) are kept under the first, the new one last."""
    path = Path(path)
    header = f"# resolved configuration (from {cfg.config or 'built-in defaults'} and command-line flags)\n"
    with writing_outputs(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and getattr(cfg, "resume", None) is not None:  # a new run has none of them
            header += "".join(dict.fromkeys(line for line in path.read_text(encoding="utf-8", errors="replace")
                                          .splitlines(keepends=True) if line.startswith(RESUMED_LINE)))
            # (errors: a config.yaml edited by hand in another encoding stopped the resume in a traceback)
    if resumed_line and resumed_line + "\n" not in header:  # (a resume again after one that failed at its start)
        header += resumed_line + "\n"
    # whole or not at all: a --resume without --config reads it (rewritten in place, a kill left it empty)
    write_text_atomic(path, header + yaml.dump(config_dict(cfg), Dumper=_Dumper, sort_keys=False))


# -------------------------------------------------------------------------------------- reference
def show_value(value):
    """A config value as config.yaml and the docs spell it (null, true, [0.3, 0.4], not Python's None, True): in
    --help, docs/config.md and the messages that name a setting."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _scripts_label(scripts):
    trains = [SCRIPTS[s].file for s in scripts if s in TRAINERS]
    evaluates = [SCRIPTS[s].file for s in scripts if s in EVALUATORS]
    return ", ".join((["training"] if len(trains) == 2 else trains) + (["evaluators"] if len(evaluates) == 2
                                                                        else evaluates))


def markdown():
    """docs/config.md: every key by section (name, default, accepted values, scripts, description)."""
    imagenet = script_defaults("evaluate_imagenet")  # config/ILSVRC.yaml's, stated here from that one source
    view = "ten-crop" if imagenet["tencrop"] else "no ten-crop"
    lines = ["# Config keys", "",
             "Generated from `utils/config.py` by `python -m utils.config --markdown > docs/config.md`.", "",
             "Every key is a config-file key and a flag (`eval_batch_size` -> `--eval-batch-size`; a boolean key is "
             "a flag without a value, `--tencrop` / `--no-tencrop`). A value means the same in both: `true`/`false` "
             "(also yes/no, on/off, 1/0), `auto` and `null` (also none), in any case, quoted or not. Flags "
             "override the config file, which overrides the defaults. A config file may start from another one: "
             "`base: CUB.yaml` (a path relative to the file: a config copied out of `config/` names its base by "
             "its full path), then states what differs. A path (of a file or "
             "folder, and `--config`, `--resume`, `base`) may start with `~`, your home folder, as in a shell (in "
             "a config file and after `=`, as in `--output-dir=~/runs`, for the tools' flags too).",
             "",
             "Defaults: the built-in ones are the official CUB settings (`config/CUB.yaml`). `train.py` without "
             f"`--config` reads `config/CUB.yaml` (`config/{DEMO_CONFIG}` without `--data-root`), "
             "`train_ImageNet.py` `config/ILSVRC.yaml`, whose keys are its defaults (a `--config` file without "
             "`base:` overrides the official ImageNet settings, not CUB's). `evaluator.py` takes the data, "
             "evaluation and test keys of `config/CUB.yaml` as its defaults, `evaluator_ImageNet.py` those of "
             f"`config/ILSVRC.yaml` (threshold {imagenet['threshold']}, {view}); a `--config` file overrides them.",
             ""]
    for section, text in SECTIONS.items():
        lines += [f"## {section}", "", text, "", "| key | default | values | scripts | description |",
                  "| :-- | :-- | :-- | :-- | :-- |"]
        lines += [f"| `{key}` | `{show_value(field.default)}` | {field.expected()} | {_scripts_label(field.scripts)} | "
                  f"{field.help.replace('<', '&lt;')} |"
                  for key, field in FIELDS.items() if field.section == section]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m utils.config --markdown > docs/config.md")
    print(markdown(), end="")
