"""The bench workload: the same model, data and steps, as a raw PyTorch loop or under OnTheFly.

python bench/_workload.py raw --model mlp --steps 1500      # prints JSON timing
onthefly run bench/_workload.py onthefly --model mlp ...    # timing read from the store
"""

import argparse
import json
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

p = argparse.ArgumentParser()
p.add_argument("mode", choices=["raw", "onthefly"])
p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
p.add_argument("--steps", type=int, default=1000)
p.add_argument("--warmup", type=int, default=50)
args = p.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)
if args.model == "mlp":
    x = torch.randn(8192, 128)
    y = torch.randint(0, 10, (8192,))
    model = nn.Sequential(
        nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    bs = 128
else:
    x = torch.randn(2048, 3, 32, 32)
    y = torch.randint(0, 10, (2048,))
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    bs = 64
loader = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, drop_last=True)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
loss_fn = nn.CrossEntropyLoss()
epochs = -(-args.steps // len(loader))

if args.mode == "raw":
    step = 0
    t_start = 0.0
    done = False
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            step += 1
            if step == args.warmup:
                t_start = time.perf_counter()
            if step == args.steps:
                done = True
                break
        if done:
            break
    t = time.perf_counter() - t_start
    print(json.dumps({"step_ms": 1000 * t / (args.steps - args.warmup)}))
else:
    from onthefly import Trainer

    Trainer(project="bench", max_epochs=epochs, max_steps=args.steps).fit(
        model, opt, loss_fn, loader
    )
