#!/usr/bin/env python3
"""PyTorch reference for ``medseg bench``: the benchmark's U-Net written plainly in PyTorch.

Standalone (imports torch, not medseg), so it runs in any interpreter that has torch:
``medseg bench --torch-python /path/to/venv/bin/python``. Same network as
``configs/bench-unet.yaml``: 4 poolings, filters 32-64-128-256-512, two (3x3 conv, BN, ReLU) per
level, 2x2 max-pool, 2x2 transposed conv, skip concatenation, 1x1 conv head, BCE+Dice, Adam.
Prints one JSON line: ``plain_train_img_s``, ``plain_infer_img_s`` (and ``monai_*`` with
``--monai`` when MONAI is installed).

    python bench_torch_reference.py [--size 256] [--batch 8] [--channels 3] [--seconds 20]
"""

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, c_in: int = 3, f=(32, 64, 128, 256, 512)):
        super().__init__()
        self.down = nn.ModuleList([block(c_in if i == 0 else f[i - 1], c) for i, c in enumerate(f)])
        ups = range(len(f) - 1, 0, -1)
        self.up = nn.ModuleList([nn.ConvTranspose2d(f[i], f[i - 1], 2, stride=2) for i in ups])
        self.dec = nn.ModuleList([block(f[i - 1] * 2, f[i - 1]) for i in ups])
        self.head = nn.Conv2d(f[0], 1, 1)

    def forward(self, x):
        skips = []
        for i, down in enumerate(self.down):
            x = down(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], 1))
        return self.head(x)


def bce_dice(logits, y):
    p = torch.sigmoid(logits)
    inter = (p * y).sum((1, 2, 3))
    den = p.sum((1, 2, 3)) + y.sum((1, 2, 3))
    return F.binary_cross_entropy_with_logits(logits, y) + (1 - (2 * inter + 1) / (den + 1)).mean()


def measure(model, x, y, seconds: float, train: bool) -> float:
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def step():
        if train:
            model.train()
            opt.zero_grad(set_to_none=True)
            bce_dice(model(x), y).backward()
            opt.step()
        else:
            model.eval()
            with torch.inference_mode():
                model(x)

    for _ in range(2):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--monai", action="store_true", help="also MONAI's BasicUNet, if installed")
    a = ap.parse_args()
    torch.manual_seed(0)
    x = torch.rand(a.batch, a.channels, a.size, a.size)
    y = (torch.rand(a.batch, 1, a.size, a.size) > 0.9).float()
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    out.update(size=a.size, batch=a.batch)
    model = UNet(a.channels)
    out["plain_params"] = sum(p.numel() for p in model.parameters())
    out["plain_train_img_s"] = measure(model, x, y, a.seconds, True)
    out["plain_infer_img_s"] = measure(model, x, y, a.seconds / 2, False)
    if a.monai:
        try:
            from monai.networks.nets import BasicUNet
        except ImportError:
            out["monai"] = "not installed"
        else:
            feats = (32, 64, 128, 256, 512, 32)
            mb = BasicUNet(spatial_dims=2, in_channels=a.channels, out_channels=1, features=feats)
            out["monai_train_img_s"] = measure(mb, x, y, a.seconds, True)
            out["monai_infer_img_s"] = measure(mb, x, y, a.seconds / 2, False)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
