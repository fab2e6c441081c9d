"""A real training run with ResNet-18's exact state-dict layout, as safetensors checkpoints.

torchvision's ``resnet18(num_classes=10)`` written out in torch (the names and shapes of
``resnet18.py``; torchvision is not needed), trained with SGD (momentum 0.9, weight decay 5e-4,
constant learning rate 0.05, batches of 64) on scikit-learn's digits, upsampled from 8×8 to
32×32 and repeated over 3 channels. Cheap on purpose: 4 batches per epoch, 30 epochs, one
checkpoint after each. It is still a genuine SGD trajectory: BatchNorm running statistics move,
``num_batches_tracked`` counts steps, late epochs are noisy (small batches at a constant rate),
and the last three 3×3 convolutions of ``layer4`` are frozen, as when fine-tuning, so 63 % of the
floats never move (a real run's constant parameters). Seeded and cached: a folder is reused when
its ``DONE`` marker matches.

    python benchmarks/train.py FOLDER
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VERSION = 1
EPOCHS, BATCHES, BATCH = 30, 4, 64
FROZEN = ("layer4.0.conv2.", "layer4.1.conv1.", "layer4.1.conv2.")


def resnet18_model(nn):
    """torchvision's ResNet-18 (BasicBlock, [2, 2, 2, 2]) built from ``nn`` (torch.nn, imported by the
    caller): the state-dict names and shapes of ``resnet18.py``."""
    class Block(nn.Module):
        def __init__(self, cin: int, planes: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != planes:
                self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet18(nn.Module):
        def __init__(self, num_classes: int = 10):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin = 64
            for i, planes in enumerate((64, 128, 256, 512), start=1):
                stride = 1 if i == 1 else 2
                setattr(self, f"layer{i}", nn.Sequential(Block(cin, planes, stride), Block(planes, planes, 1)))
                cin = planes
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet18()


def train(folder: Path, seed: int = 0) -> Path:
    """Write ``epoch_1.safetensors … epoch_30.safetensors`` into ``folder`` unless cached."""
    folder = Path(folder)
    marker = folder / "DONE"
    key = json.dumps({"version": VERSION, "epochs": EPOCHS, "batches": BATCHES, "batch": BATCH, "seed": seed})
    if marker.exists() and marker.read_text() == key:
        return folder
    import torch
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # the benchmark machine is shared
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = ((images - images.mean()) / images.std()).expand(-1, 3, -1, -1).contiguous()
    targets = torch.tensor(digits.target, dtype=torch.int64)
    model = resnet18_model(torch.nn)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(FROZEN))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                                weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(1, EPOCHS + 1):
        order = torch.randperm(len(images), generator=generator)[:BATCHES * BATCH].view(BATCHES, BATCH)
        for batch in order:
            loss = torch.nn.functional.cross_entropy(model(images[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / f"epoch_{epoch}.safetensors"),
                  metadata={"epoch": str(epoch), "loss": f"{loss.item():.4f}"})
    marker.write_text(key)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    print(train(parser.parse_args().folder))
