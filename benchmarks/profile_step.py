"""A few fused steps on TinyLlama-1.1B shapes, to profile with Nsight Compute:

    ncu --kernel-name regex:step_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \\
        python benchmarks/profile_step.py adamw
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import tinyllama_shapes  # noqa: E402

import slimoptim  # noqa: E402

FACTORIES = {
    "adamw": lambda p: slimoptim.AdamW(p, lr=1e-4),
    "sgd": lambda p: slimoptim.SGD(p, lr=1e-3, momentum=0.9),
    "lion": lambda p: slimoptim.Lion(p, lr=1e-4),
}

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "adamw"
    torch.manual_seed(0)
    shapes = tinyllama_shapes()
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").bfloat16()) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = FACTORIES[name](params)
    for _ in range(4):
        opt.step()
    torch.cuda.synchronize()
