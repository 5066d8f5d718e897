"""Model selection during training: which epochs are evaluated (``should_evaluate``), the protocol and the
metric that picks best.pth for the evaluation split's annotations (``EvalPlan``, ``plan_evaluation``), the best
checkpoints each evaluation improves (``update_best``, the official ``>``) and the metrics an evaluation records
in metrics.jsonl and results.json (``recorded_keys``). The rules: docs/training.md, model selection.
"""
import logging
from dataclasses import dataclass

from DataLoader.eval_loader import split_annotations
from DataLoader.eval_views import includes_sat, views_of
from utils.metrics import chosen_wsol_threshold

RESULT_KEYS = ("top1_loc", "top5_loc", "gt_known_loc", "top1_cls", "top5_cls", "iou30", "iou50", "iou70",
               "num_images")
SAT_THRESHOLD_KEYS = ("threshold", "best_threshold")  # recorded on their own (results.json: with at_best_threshold)
# The checkpoints kept during training, each the first epoch reaching the maximum of its metric, as the
# official train.py keeps best_loc / best_top1 / best_gt; best.pth follows selection_metric (official: loc).
EXTRA_BEST = {"best_top1_loc.pth": "top1_loc", "best_gt_known_loc.pth": "gt_known_loc"}
_logger = logging.getLogger("sat")


@dataclass
class EvalPlan:
    """How training evaluates: ``protocol`` (eval_protocol resolved from the data) and the ``selection_metric``
    that exists for the evaluation split's annotations."""
    protocol: str
    selection_metric: str

    @property
    def sat(self):
        """Whether the sat protocol is evaluated (map thresholds, best_top1_loc.pth / best_gt_known_loc.pth)."""
        return includes_sat(self.protocol)

    @property
    def classifies_official_view(self):
        """Whether classification is scored on the official test view (centre or ten-crop): every protocol
        but wsol, which scores its own whole-image view."""
        return self.protocol != "wsol"


def selection_metrics(protocol, annotations):
    """The selection metrics an evaluation produces, the natural choice first."""
    sat = ("loc", "top1_loc", "gt_known_loc")
    wsol = {"boxes": ("maxboxaccv2",), "masks": ("pxap",), None: ()}[annotations]
    return {"sat": sat, "wsol": wsol, "both": sat + wsol, "cls": ()}[protocol] + ("top1_cls",)


def plan_evaluation(cfg, dataset):
    """The :class:`EvalPlan` of the evaluation split ``dataset`` (whose views follow the resolved protocol);
    logs the protocol and the selection metric."""
    protocol = views_of(dataset).protocol
    annotations = split_annotations(dataset)
    available = selection_metrics(protocol, annotations)
    metric = cfg.selection_metric if cfg.selection_metric in available else available[0]
    names = {"sat": "sat protocol", "wsol": "wsol protocol", "both": "sat and wsol protocols",
             "cls": "classification only"}
    _logger.info("evaluation: %s (eval_protocol %s; the evaluation split has %s); best.pth by %s%s", names[protocol],
                 cfg.eval_protocol, annotations or "neither boxes nor masks", metric,
                 "" if metric == cfg.selection_metric else f" (selection_metric {cfg.selection_metric} does not "
                 f"exist for this evaluation)")
    return EvalPlan(protocol, metric)


def should_evaluate(cfg, epoch):
    """Whether the model after ``epoch`` (0-based) is evaluated for selection: from eval_start_epoch every
    eval_every epochs (official CUB: every epoch from 26 of 30), and always after the last epoch."""
    done = epoch + 1
    return done == cfg.epochs or (done >= cfg.eval_start_epoch and done % cfg.eval_every == 0)


def scalars(metrics):
    """The numeric entries of an evaluation's metrics (no per-threshold lists or per-IoU tables)."""
    return {key: value for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def recorded_keys(metrics, plan):
    """The metrics an evaluation's line in metrics.jsonl and results.json hold: RESULT_KEYS under the sat
    protocol, every scalar metric under the others, and under both the sat protocol's with the wsol ones."""
    keys = RESULT_KEYS if plan.sat else ()
    if plan.protocol != "sat":
        keys += tuple(key for key in scalars(metrics) if key not in keys and key not in SAT_THRESHOLD_KEYS)
    return keys


def selection_value(metrics, metric):
    """The value best.pth maximises: ``loc`` is Top-1 Loc + GT-known Loc (official best_loc), else the metric."""
    if metric == "loc":
        return float(metrics["top1_loc"]) + float(metrics["gt_known_loc"])
    return float(metrics[metric])


def update_best(best, metrics, selection_metric, epoch, sat=True):
    """Update ``best`` ({checkpoint file: {'metric', 'value', 'epoch', 'threshold'}, with the wsol protocol also
    'wsol_threshold': the epoch's MaxBoxAcc or PxAP map threshold, for the final test to report at}) with this
    epoch's metrics; a file improves only on a strictly higher value (the first epoch wins ties, as the official
    ``>``); with the sat protocol, best_top1_loc.pth and best_gt_known_loc.pth too. Returns the improved files."""
    improved = []
    wsol_threshold = chosen_wsol_threshold(metrics)
    for name, metric in {"best.pth": selection_metric, **(EXTRA_BEST if sat else {})}.items():
        value = selection_value(metrics, metric)
        if name not in best or value > best[name]["value"]:
            best[name] = {"metric": metric, "value": value, "epoch": epoch + 1,
                          "threshold": metrics.get("best_threshold"),
                          **({"wsol_threshold": wsol_threshold} if wsol_threshold is not None else {})}
            improved.append(name)
    return improved
