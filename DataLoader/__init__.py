"""Datasets (CUB release, ILSVRC2012, wsolevaluation metadata, custom folders, synthetic demo),
official transforms and loaders for SAT."""
from . import demo, transforms
from .build import FORMATS, SPLITS, build_dataset, check_data_root
from .dataset import WSOLDataset
from .demo import DEFAULT_DEMO_ROOT, make_demo_dataset
from .formats.wsol import load_mask
from .loader import build_loader, collate_samples

__all__ = ["FORMATS", "SPLITS", "DEFAULT_DEMO_ROOT", "WSOLDataset", "build_dataset", "build_loader",
           "check_data_root", "collate_samples", "demo", "load_mask", "make_demo_dataset", "transforms"]
