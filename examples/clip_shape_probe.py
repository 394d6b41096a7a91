"""Why the built-in CLIP is slow to learn shapes: the same ViT image tower trained *supervised* to name the shape
of single-object web-corpus images, beside a 4-layer CNN of the same data, one epoch at a time.

The figures of the README's CLIP section ("shape is the hard part") come from this script:

    python examples/clip_shape_probe.py CACHE [--epochs 10] [--image-size 48 --patch-size 6] [--width 128]

CACHE holds the web corpus (`refground data synth --preset web`). Prints one line per epoch and model: training
loss, held-out accuracy (the last 1,000 of 6,000 single-object images), seconds. Seeded (torch seed 0).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def main() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from refground.data.store import load_dataset
    from refground.features.clip_train import ClipTrainConfig, image_processor, normalise
    from refground.features.detector_train import load_images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", type=Path)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--patch-size", type=int, default=6)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    web = load_dataset(a.cache / "web" / "dataset")
    ids = [int(i) for i in web.image_ids if len(web.objects_of(int(i))) == 1][:6000]
    cfg = ClipTrainConfig(image_size=a.image_size, patch_size=a.patch_size)
    proc = image_processor(cfg)
    px = torch.cat([proc(images=load_images(web, ids[k:k + 256]), return_tensors="pt", do_rescale=False,
                         do_normalize=False)["pixel_values"].round().clamp(0, 255).to(torch.uint8)
                    for k in range(0, len(ids), 256)])
    y = torch.tensor([list(web.categories).index(web.objects_of(i)[0].category) for i in ids])
    ntr = len(ids) - 1000
    torch.manual_seed(0)
    vit = CLIPVisionModel(CLIPVisionConfig(hidden_size=a.width, intermediate_size=4 * a.width,
                                           num_hidden_layers=a.layers, num_attention_heads=4,
                                           image_size=a.image_size, patch_size=a.patch_size))
    vit_head = nn.Linear(a.width, len(web.categories))
    cnn = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                        nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, len(web.categories)))
    models = {"vit": (lambda x: vit_head(vit(pixel_values=x).pooler_output),
                      [*vit.parameters(), *vit_head.parameters()]),
              "cnn": (cnn, list(cnn.parameters()))}
    for name, (fn, params) in models.items():
        opt = torch.optim.AdamW(params, lr=a.lr)
        t0 = time.perf_counter()
        for epoch in range(a.epochs):
            perm = torch.randperm(ntr)
            for s in range(ntr // 64):
                idx = perm[s * 64:(s + 1) * 64]
                loss = F.cross_entropy(fn(normalise(px[idx])), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                acc = float((fn(normalise(px[ntr:])).argmax(1) == y[ntr:]).float().mean())
            print(f"{name} epoch {epoch + 1} step {(epoch + 1) * (ntr // 64)} loss {float(loss):.3f} "
                  f"held-out accuracy {acc:.3f} seconds {time.perf_counter() - t0:.0f}", flush=True)


if __name__ == "__main__":
    main()
