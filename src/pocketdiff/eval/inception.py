"""FID's Inception-v3 (the 2015 TensorFlow graph that FID and IS are defined on), loaded from a local file.

The network is the one pytorch-fid and torch-fidelity port: torchvision's Inception-v3 layout with the FID
graph's differences (average pools that do not count padding; max pooling in the last block; 1008 classes).
Its parameter names are the ported checkpoint's (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.
running_mean``, ..., ``fc.weight``), so pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, converted once
to safetensors, loads as it is (README shows the one-line conversion); pocketdiff never downloads it.

Outputs: the 2048-d pool features (FID) and the 1008 logits without the fc bias (IS, as torch-fidelity's
``logits_unbiased``). Inputs: (N, 3, 299, 299) RGB in [0, 1] (:func:`inception_input` resizes to 299 with
PIL's bicubic filter, as clean-fid does for both image sets).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PocketdiffError

INPUT_SIZE = 299
CONVERT_HINT = ("convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth once: python -c \"import torch; "
                "from safetensors.torch import save_file; save_file(torch.load('pt_inception-2015-12-05-6726825d.pth', "
                "weights_only=True), 'inception-2015-12-05.safetensors')\"")


class BasicConv2d(nn.Module):
    """Convolution (no bias), batch norm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), dbl,
                          self.branch_pool(_avg(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``pool="avg"``: the FID graph's Mixed_7b; ``"max"``: its Mixed_7c."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """``forward(x) -> (pool features (N, 2048), logits without the fc bias (N, 1008))``."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, "avg"), InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = 2 * x - 1  # [0, 1] -> the graph's [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        features = x.mean(dim=(2, 3))
        return features, features @ self.fc.weight.T


def load_inception(path: str | Path | None) -> FIDInceptionV3:
    """The network with the weights of a local safetensors file; a one-line error when there is none."""
    from safetensors.torch import load_file

    if not path:
        raise PocketdiffError(f"FID and IS need the FID Inception weights: pass --inception FILE.safetensors; {CONVERT_HINT}")
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        raise PocketdiffError(f"{path}: not a .safetensors file of FID Inception weights; {CONVERT_HINT}")
    state = {k: v.float() for k, v in load_file(str(path)).items() if not k.endswith("num_batches_tracked")}
    net = FIDInceptionV3()
    want = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    wrong = sorted(set(want) ^ set(state)) + sorted(k for k in set(want) & set(state) if state[k].shape != want[k])
    if wrong:
        raise PocketdiffError(f"{path}: not FID Inception-v3 weights ({len(wrong)} tensors missing, extra or of "
                              f"another shape, e.g. {wrong[0]}); {CONVERT_HINT}")
    net.load_state_dict(state, strict=False)  # only the num_batches_tracked counters stay as built
    return net.eval().requires_grad_(False)


def inception_input(images) -> torch.Tensor:
    """(N, 3, 299, 299) float in [0, 1] from uint8 (N, H, W, 3) arrays or PIL images (bicubic resize)."""
    from PIL import Image

    out = []
    for im in images:
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))
        im = im.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC)
        out.append(np.asarray(im, np.float32) / 255.0)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


@torch.no_grad()
def inception_outputs(net: FIDInceptionV3, images, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(pool features (N, 2048), logits (N, 1008)) of ``images`` as float64 arrays."""
    feats, logits = [], []
    images = list(images)
    for i in range(0, len(images), batch_size):
        f, lg = net(inception_input(images[i:i + batch_size]))
        feats.append(f.double().numpy())
        logits.append(lg.double().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` equal parts (Salimans et al. 2016)."""
    logits = np.asarray(logits, np.float64)
    splits = max(1, min(splits, len(logits)))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
