"""The views an evaluation feeds the model, and the protocols that use them.

Views (one name each, used in code, flags, metrics.json and docs):
- ``centre``: Resize((resize_size, resize_size)) -> CenterCrop(img_size), the official test view;
- ``tencrop``: TenCrop(img_size) of the same resized image, for classification (the mean of the ten
  softmaxes); its centre crop, index 4, is the ``centre`` view and gives the map;
- ``wsol``: Resize((img_size, img_size)) without crop, the wsolevaluation view.

Protocols (flag ``--eval-protocol``): ``sat`` = the official SAT protocol (evaluator.py's
``val_loc_one_epoch``: Top-1 / Top-5 / GT-known Loc at a fixed map threshold, on the ``centre`` or
``tencrop`` view); ``wsol`` = wsolevaluation's protocol (MaxBoxAcc, MaxBoxAccV2, PxAP, on the ``wsol``
view); ``both``; ``cls`` = classification only (data with neither boxes nor masks).
"""
import torch

from utils.errors import ConfigError

from . import transforms as T

PROTOCOLS = ("sat", "wsol", "both", "cls")
TENCROP_CENTRE = 4  # torchvision TenCrop order: four corners, centre, then the same flipped
VIEW_SIZES = {"centre": 1, "tencrop": 10, "wsol": 1}


def default_resize_size(img_size):
    """The official Resize((256, 256)) before CenterCrop(224), scaled to other input sizes."""
    return round(img_size * 256 / 224)


def includes_sat(protocol):
    """Whether ``protocol`` scores the sat protocol (map thresholds, Top-1 / GT-known Loc): sat and both.
    (utils/metrics.py and tools/compare.py spell both predicates out: they are imported without the data code.)"""
    return protocol in ("sat", "both")


def includes_wsol(protocol):
    """Whether ``protocol`` scores the wsol protocol (the wsol view, MaxBoxAcc, PxAP): wsol and both."""
    return protocol in ("wsol", "both")


def protocol_views(protocol, tencrop=False):
    """The views a protocol reads: ``sat`` / ``cls`` -> (centre | tencrop), ``wsol`` -> (wsol), ``both`` -> both."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r} (expected one of {', '.join(PROTOCOLS)})")
    official = ("tencrop" if tencrop else "centre",) if protocol != "wsol" else ()
    return official + (("wsol",) if includes_wsol(protocol) else ())


class EvalViews:
    """PIL image -> (V, 3, S, S): the views of ``protocol`` stacked in order; ``slices[view]`` locates each.

    ``evaluate`` reads the protocol and the view settings from this transform of the loader's dataset.
    """

    def __init__(self, protocol="sat", tencrop=False, img_size=224, resize_size=None):
        self.protocol, self.names = protocol, protocol_views(protocol, tencrop)
        self.img_size = int(img_size)
        self.resize_size = int(resize_size or default_resize_size(img_size))
        if self.resize_size < self.img_size and self.names != ("wsol",):
            raise ConfigError(f"resize_size {self.resize_size} (--resize-size) is smaller than the input size "
                              f"{self.img_size}: the {self.names[0]} view crops {self.img_size} pixels of it")
        builders = {"centre": T.test_transform, "tencrop": T.tencrop_transform}
        self.transforms = [T.wsol_transform(self.img_size) if view == "wsol"
                           else builders[view](self.img_size, self.resize_size) for view in self.names]
        self.slices, start = {}, 0
        for view in self.names:
            self.slices[view] = slice(start, start + VIEW_SIZES[view])
            start += VIEW_SIZES[view]
        self.num_views = start

    def pixels(self, gpu_decode=False):
        """The uint8 worker half of these views (``transforms.EvalPixels``: decode and resize only;
        ``evaluate`` crops and normalises on its device, the same tensors), with these ``views`` attached.
        ``gpu_decode``: the file bytes, decoded and resized on the device too."""
        sat_views = next((self.slices[view] for view in ("centre", "tencrop") if view in self.slices), None)
        pixels = T.EvalPixels(0 if sat_views is None else sat_views.stop - sat_views.start, "wsol" in self.slices,
                              self.img_size, self.resize_size, gpu_decode=gpu_decode)
        pixels.views = self
        return pixels

    @property
    def tencrop(self):
        return "tencrop" in self.names

    def __call__(self, image):
        views = [transform(image) for transform in self.transforms]
        return torch.cat([view.reshape(-1, *view.shape[-3:]) for view in views])

    def __repr__(self):
        return f"EvalViews({self.protocol!r}, views={list(self.names)}, img_size={self.img_size}, " \
               f"resize_size={self.resize_size})"


def views_of(dataset):
    """The ``EvalViews`` a dataset's samples follow: its transform, or the views of its uint8 half; a dataset
    without them (another transform, a loader without a dataset) is a ConfigError in one line."""
    transform = getattr(dataset, "transform", None)
    views = getattr(transform, "views", transform)
    if not hasattr(views, "protocol"):
        raise ConfigError(f"the loader's dataset ({type(dataset).__name__}, transform {type(transform).__name__}) "
                          "has no EvalViews, which give the protocol and views to evaluate: build the loader with "
                          "build_eval_loader, give build_dataset transform=EvalViews(...), or pass "
                          "views=EvalViews(...)")
    return views
