"""Deterministic toy sources for testing the extraction machinery without training a model.

``FakeSource`` proposes pseudo-random boxes seeded by the image id and describes a box by its mean colour
and its coordinates; ``FakeClip`` embeds an image by its normalised mean colour and a text by its length
and vowels. Both are obviously deterministic, so any difference between two artifacts is the store's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from refground.features.base import Proposals


class FakeSource:
    class_names = ["a", "b"]
    feature_dim = 7
    dense_channels = {8: 3, 16: 3, 32: 3}

    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after  # raise KeyboardInterrupt on this many propose() calls (an interruption)

    def identity(self) -> dict:
        return {"kind": "fake"}

    def propose(self, images, image_ids, max_proposals):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        out = []
        for im, iid in zip(images, image_ids):
            h, w = im.shape[:2]
            g = torch.Generator().manual_seed(int(iid))
            k = int(torch.randint(0, 12, (1,), generator=g))
            xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
            wh = torch.rand(k, 2, generator=g) * 20 + 5
            boxes = torch.cat([xy, xy + wh], 1)[:max_proposals]
            sc = torch.rand(k, generator=g).sort(descending=True).values[:max_proposals]
            out.append(Proposals(boxes, sc, torch.zeros(len(sc), dtype=torch.int64), torch.stack([sc, 1 - sc], 1)))
        return out

    def region_features(self, images, boxes):
        out = []
        for im, b in zip(images, boxes):
            t = torch.as_tensor(im, dtype=torch.float32).permute(2, 0, 1)
            f = []
            for x1, y1, x2, y2 in b.tolist():
                reg = t[:, int(y1):max(int(y2), int(y1) + 1), int(x1):max(int(x2), int(x1) + 1)]
                f.append(torch.cat([reg.mean((1, 2)) / 255, torch.tensor([x1, y1, x2, y2]) / 100]))
            out.append(torch.stack(f) if f else torch.zeros(0, 7))
        return out

    def dense_maps(self, images, size):
        out = []
        for im in images:
            t = torch.as_tensor(im, dtype=torch.float32).permute(2, 0, 1)[None] / 255
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
            out.append({s: F.avg_pool2d(t, s)[0] for s in (8, 16, 32)})
        return out


class FakeClip:
    embed_dim = 4

    def identity(self) -> dict:
        return {"kind": "fake-clip"}

    def embed_images(self, images):
        e = torch.stack([torch.cat([torch.as_tensor(im, dtype=torch.float32).mean((0, 1)), torch.ones(1)])
                         for im in images])
        return F.normalize(e, dim=1)

    def embed_texts(self, texts):
        e = torch.tensor([[len(t), sum(c in "aeiou" for c in t), t.count(" "), 1.0] for t in texts])
        return F.normalize(e, dim=1)


def boxes_of(ds, row: int) -> np.ndarray:
    off = ds.image_object_offsets
    return ds.object_boxes[off[row]:off[row + 1]]
