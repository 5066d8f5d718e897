"""Official image transforms (the official DataLoader/*.py) and their uint8 halves for the device pipeline
(``TrainPixels``, ``EvalPixels``; the other half is DataLoader/device_transforms.py; with ``gpu_decode``
they return the file's bytes, decoded by DataLoader/gpu_decode.py)."""
import numpy as np
import torch
from torchvision import transforms as T
from torchvision.io import read_file

from utils.boxes import centre_offset

from .check import TAIL_BYTES, tail_has_end_marker
from .device_transforms import IMAGENET_MEAN, IMAGENET_STD


def _to_normalized_tensor():
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(img_size=224, resize_size=256):
    """Resize((256, 256)) -> RandomCrop(224) -> RandomHorizontalFlip -> ToTensor -> Normalize."""
    return T.Compose([T.Resize((resize_size, resize_size)), T.RandomCrop(img_size),
                      T.RandomHorizontalFlip(), *_to_normalized_tensor()])


def test_transform(img_size=224, resize_size=256):
    """Resize((256, 256)) -> CenterCrop(224) -> ToTensor -> Normalize (the `centre` view)."""
    return T.Compose([T.Resize((resize_size, resize_size)), T.CenterCrop(img_size), *_to_normalized_tensor()])


def _stack_normalized(crops):
    normalize = T.Compose(_to_normalized_tensor())
    return torch.stack([normalize(crop) for crop in crops])


def tencrop_transform(img_size=224, resize_size=256):
    """Resize((256, 256)) -> TenCrop(224) -> (10, 3, 224, 224); index 4 is the centre crop."""
    return T.Compose([T.Resize((resize_size, resize_size)), T.TenCrop(img_size), T.Lambda(_stack_normalized)])


def wsol_transform(img_size=224):
    """Resize((224, 224)) without crop -> ToTensor -> Normalize (the `wsol` view)."""
    return T.Compose([T.Resize((img_size, img_size)), *_to_normalized_tensor()])


def tencrop_boxes(size, crop_size):
    """TenCrop's (top, left, flip) in its order: corners, centre, then the same crops of the mirrored
    image, i.e. the mirrored positions of the original, flipped."""
    far, mid = size - crop_size, centre_offset(size, crop_size)
    five = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]
    return [(top, left, 0) for top, left in five] + [(top, far - left, 1) for top, left in five]


def _pixels(image):
    return torch.from_numpy(np.array(image, dtype=np.uint8))  # RGB PIL image -> (H, W, 3)


def draw_crop(size, crop_size):
    """(top, left, flip) of RandomCrop(crop_size) + RandomHorizontalFlip for a size x size image, drawn with
    the same torch RNG calls as those transforms (``RandomCrop.get_params`` itself, given a tensor of that
    shape that holds no memory)."""
    shape_only = torch.empty((1, 1, 1), dtype=torch.uint8).expand(3, size, size)
    top, left, _, _ = T.RandomCrop.get_params(shape_only, (crop_size, crop_size))
    flip = int(torch.rand(1) < 0.5)
    return torch.tensor([top, left, flip])


def file_bytes(image):
    """``gpu_decode``: a PIL image opened but not decoded -> its file's bytes (uint8), path, and whether the
    JPEG decoder of the device may take it (``'jpeg'``: a JPEG of 1 or 3 components, not CMYK, PNG, ..., that
    ends with its end marker: nvJPEG's hardware path may give a truncated file's missing part as grey instead of
    failing, where libjpeg and PIL refuse it, as the PIL path does)."""
    encoded = read_file(image.filename)
    jpeg = (image.format == "JPEG" and image.mode in ("RGB", "L")
            and tail_has_end_marker(encoded[-TAIL_BYTES:].numpy().tobytes(), "JPEG"))
    return {"encoded": encoded, "path": image.filename, "jpeg": jpeg}


class TrainPixels:
    """PIL image -> ``{'pixels': uint8 (R, R, 3), 'crops': (top, left, flip)}``: Resize((R, R)), then the
    parameters of RandomCrop(S) and RandomHorizontalFlip drawn as those transforms draw them.
    ``gpu_decode``: the dataset gives the image undecoded (``gpu_decode`` attribute), and the result holds
    its file's bytes (``encoded``) and ``resize_size`` instead of pixels, with the same crops.
    ``resized`` / ``from_resized`` are the two halves of the PIL path, for an image cache
    (DataLoader/image_cache.py) that keeps ``resized``'s pixels (``cache_size`` = R)."""

    def __init__(self, img_size=224, resize_size=256, gpu_decode=False):
        self.img_size, self.resize_size, self.gpu_decode = img_size, resize_size, gpu_decode
        self.resize = T.Resize((resize_size, resize_size))
        self.cache_size = None if gpu_decode else resize_size

    def resized(self, image):
        return _pixels(self.resize(image))

    def from_resized(self, pixels):
        return {"pixels": torch.as_tensor(pixels), "crops": draw_crop(self.resize_size, self.img_size),
                "crop_size": self.img_size}

    def __call__(self, image):
        if self.gpu_decode:
            return {**file_bytes(image), "resize_size": self.resize_size,
                    "crops": draw_crop(self.resize_size, self.img_size), "crop_size": self.img_size}
        return self.from_resized(self.resized(image))


class EvalPixels:
    """PIL image -> the uint8 sources of the evaluation views: ``'pixels'`` (Resize((R, R))) with its ``'crops'``
    (the centre crop, or the 10 of TenCrop) for the ``num_sat_views`` sat views, and ``'wsol'`` (Resize((S, S)),
    the whole image) for the wsol view; ``to_device`` gives the same (V, 3, S, S) stack as
    ``DataLoader.eval_views.EvalViews``. ``gpu_decode``: the file's bytes (``encoded``) with the sizes to resize
    to on the device (``resize_size`` for the sat views, ``wsol_size`` for the wsol view: one decode)."""

    def __init__(self, num_sat_views, wsol, img_size=224, resize_size=256, gpu_decode=False):
        self.img_size, self.resize_size, self.gpu_decode = img_size, resize_size, gpu_decode
        self.resize_sat = T.Resize((resize_size, resize_size)) if num_sat_views else None
        self.resize_wsol = T.Resize((img_size, img_size)) if wsol else None
        # an image cache can stand for resize_sat alone (the wsol view resizes the original image)
        self.cache_size = resize_size if num_sat_views and not wsol and not gpu_decode else None
        if num_sat_views:
            mid = centre_offset(resize_size, img_size)
            boxes = tencrop_boxes(resize_size, img_size) if num_sat_views == 10 else [(mid, mid, 0)]
            self.crops = torch.tensor(boxes)

    def resized(self, image):
        return _pixels(self.resize_sat(image))

    def from_resized(self, pixels):
        return {"pixels": torch.as_tensor(pixels), "crops": self.crops, "crop_size": self.img_size}

    def __call__(self, image):
        out = file_bytes(image) if self.gpu_decode else {}
        if self.resize_sat is not None:
            out.update({"resize_size": self.resize_size, "crops": self.crops, "crop_size": self.img_size}
                       if self.gpu_decode else self.from_resized(self.resized(image)))
        if self.resize_wsol is not None:
            out.update({"wsol_size": self.img_size} if self.gpu_decode else {"wsol": _pixels(self.resize_wsol(image))})
        return out


def denormalize(tensor):
    """A normalised (3, H, W) image tensor -> uint8 (H, W, 3) numpy array for overlays."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    image = (tensor.detach().cpu().float() * std + mean).clamp(0, 1)
    return (image * 255).round().byte().permute(1, 2, 0).numpy()
