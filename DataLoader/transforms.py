"""Official image transforms (SPEC 3) and GT-box mappings of protocols A and B (SPEC 5, 6)."""
import numpy as np
import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalized_tensor():
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(img_size=224, resize_size=256):
    """Resize((256, 256)) -> RandomCrop(224) -> RandomHorizontalFlip -> ToTensor -> Normalize."""
    return T.Compose([T.Resize((resize_size, resize_size)), T.RandomCrop(img_size),
                      T.RandomHorizontalFlip(), *_to_normalized_tensor()])


def test_transform(img_size=224, resize_size=256):
    """Resize((256, 256)) -> CenterCrop(224) -> ToTensor -> Normalize (protocol A)."""
    return T.Compose([T.Resize((resize_size, resize_size)), T.CenterCrop(img_size), *_to_normalized_tensor()])


def _stack_normalized(crops):
    normalize = T.Compose(_to_normalized_tensor())
    return torch.stack([normalize(crop) for crop in crops])


def tencrop_transform(img_size=224, resize_size=256):
    """Resize((256, 256)) -> TenCrop(224) -> (10, 3, 224, 224); index 4 is the centre crop."""
    return T.Compose([T.Resize((resize_size, resize_size)), T.TenCrop(img_size), T.Lambda(_stack_normalized)])


def wsol_transform(img_size=224):
    """Resize((224, 224)) without crop -> ToTensor -> Normalize (protocol B)."""
    return T.Compose([T.Resize((img_size, img_size)), *_to_normalized_tensor()])


def denormalize(tensor):
    """A normalised (3, H, W) image tensor -> uint8 (H, W, 3) numpy array for overlays."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    image = (tensor.detach().cpu().float() * std + mean).clamp(0, 1)
    return (image * 255).round().byte().permute(1, 2, 0).numpy()


def _as_boxes(boxes):
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def boxes_protocol_a(boxes, size, resize_size=256, crop_size=224):
    """Original-pixel boxes -> the official SAT crop frame: resize to 256x256, shift, clip to 223."""
    boxes = _as_boxes(boxes)
    width, height = size
    shift = (resize_size - crop_size) // 2
    # x / W * 256 in the official order (divide first), then shift and clip.
    mapped = boxes / np.array([width, height] * 2) * resize_size - shift
    mapped[:, :2] = np.maximum(mapped[:, :2], 0)
    mapped[:, 2:] = np.minimum(mapped[:, 2:], crop_size - 1)
    return np.trunc(mapped).astype(np.int64)


def boxes_protocol_b(boxes, size, img_size=224):
    """Original-pixel boxes -> the wsolevaluation 224x224 frame: int(x * 224 / W), int(y * 224 / H)."""
    boxes = _as_boxes(boxes)
    width, height = size
    return np.trunc(boxes * img_size / np.array([width, height] * 2)).astype(np.int64)
