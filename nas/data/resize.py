"""Images at another side than the data's own, for a study that searches the input size
(`[space] image_sizes`): resized once per side, bilinear with antialiasing as PIL resizes a
folder's images (`[data] image_size`), and kept as uint8.

The normalization stays the data's: a resized image has the same mean pixel, and the deployed
graph normalizes with the statistics it was trained with."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from nas.data import Data, Split

CHUNK = 8192  # images resized at once: float32 copies of MNIST at 28x28 would take 188 MB


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) as uint8 images (N, C, size, size), on their device; the same
    tensor where they are that size already."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    parts = [F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
             .round_().clamp_(0, 255).to(torch.uint8) for chunk in images.split(CHUNK)]
    return torch.cat(parts) if parts else images.new_empty((0, images.shape[1], size, size))


def resized_split(split: Split, size: int) -> Split:
    """`split` with its training and evaluation images at `size` x `size`."""
    if split.shape.size == size:
        return split
    return replace(split, train_x=resize_images(split.train_x, size), eval_x=resize_images(split.eval_x, size))


def resized_data(data: Data, size: int) -> Data:
    """`data` with every part at `size` x `size` (its identity, which a study checks, is the
    source's and is not changed: check it before resizing)."""
    if data.shape.size == size:
        return data
    return replace(data, train_x=resize_images(data.train_x, size), valid_x=resize_images(data.valid_x, size),
                   test_x=resize_images(data.test_x, size), rest_x=resize_images(data.rest_x, size))


class SplitsBySize:
    """A search's split at each input side its trials draw, each resized once and kept (in this
    process) for the rest of the study."""

    def __init__(self, split: Split):
        self.splits = {split.shape.size: split}
        self.base = split

    def __call__(self, size: int) -> Split:
        if size not in self.splits:
            self.splits[size] = resized_split(self.base, size)
        return self.splits[size]
