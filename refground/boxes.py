"""The one home of box math. Boxes are ``Tensor[N, 4]`` xyxy in continuous absolute pixels (no +1).

(Minimal seed version; the full module -- formats, GIoU, NMS, RoIAlign, deltas -- is being written.)
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_area(boxes: Tensor) -> Tensor:
    """Area of each box. boxes: Tensor[N, 4] xyxy -> Tensor[N]."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU. boxes1: Tensor[N, 4], boxes2: Tensor[M, 4], xyxy -> Tensor[N, M] (0 where union is 0)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matched pairs. boxes1, boxes2: Tensor[N, 4] xyxy -> Tensor[N]."""
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))
