"""How far the default mode (8-bit states, 24-bit master on bf16) ends from fp32 torch.optim.

Distance between the two end points divided by the distance fp32 moved, on three
problems, the worst and mean over seeds (the README's "Semantics" numbers):

* ``linear``: torch's generic test problem (a 10x5 weight and a bias, loss (Wx + b)^2
  summed), fp32 params, 20 steps, closed loop, torch's CPU inputs, 10 seeds;
* ``drift``: random bf16 gradients plus 0.3, 1000 bf16 params, 100 steps, both sides fed
  the same gradients (``tests/test_optimizers.py``), 5 seeds;
* ``mlp``: a 16-64-1 tanh MLP regressing a random teacher, fp32 params, 200 full-batch
  steps, closed loop, 3 seeds.

Lion has no torch twin: its reference is slimoptim's exact mode (32-bit master, fp32 states).

    python benchmarks/default_mode_distance.py      # ~2 min of CPU time
"""

import torch

import slimoptim

EXACT = dict(master_weight_bits=32, state_bits=32)
LINEAR_INPUTS = {
    "AdamW": [{}, {"lr": 0.01}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "maximize": True}],
    "SGD": [
        {},
        {"momentum": 0.9},
        {"momentum": 0.9, "dampening": 0.5},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    ],
    "Lion": [{}, {"lr": 1e-3}, {"weight_decay": 0.1}, {"maximize": True}],
}
LINEAR_INPUTS["Adam"] = LINEAR_INPUTS["AdamW"]
OTHER_KWARGS = {"AdamW": {}, "Adam": {}, "SGD": dict(lr=1e-2, momentum=0.9), "Lion": dict(lr=1e-4)}


def _pair(name, ref_params, params, kwargs):
    cls = getattr(slimoptim, name)
    ref_cls = getattr(torch.optim, name, None)
    ref = ref_cls(ref_params, **kwargs) if ref_cls else cls(ref_params, **kwargs, **EXACT)
    return ref, cls(params, **kwargs)


def _relative(ours, theirs, start):
    flat = [torch.cat([p.detach().reshape(-1).double() for p in ps]) for ps in (ours, theirs)]
    return ((flat[0] - flat[1]).norm() / (flat[1] - start).norm()).item()


def closed_loop(name, kwargs, model_fn, loss_fn, steps):
    params = model_fn()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    start = torch.cat([p.detach().reshape(-1).double() for p in params])
    ref, opt = _pair(name, ref_params, params, kwargs)
    for _ in range(steps):
        for o, ps in ((ref, ref_params), (opt, params)):
            o.zero_grad()
            loss_fn(ps).backward()
            o.step()
    return _relative(params, ref_params, start)


def linear(name, kwargs, seed):
    gen = torch.Generator().manual_seed(seed)
    weight, bias, x = (torch.randn(s, generator=gen) for s in ((10, 5), (10,), (5,)))
    return closed_loop(
        name,
        kwargs,
        lambda: [torch.nn.Parameter(weight), torch.nn.Parameter(bias)],
        lambda ps: (ps[0].mv(x) + ps[1]).pow(2).sum(),
        steps=20,
    )


def mlp(name, kwargs, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=gen)
    y = torch.tanh(x @ torch.randn(16, 1, generator=gen))
    shapes = ((64, 16), (64,), (1, 64), (1,))
    init = [torch.randn(s, generator=gen) * 0.25 for s in shapes]

    def loss(ps):
        hidden = torch.tanh(x @ ps[0].t() + ps[1])
        return torch.nn.functional.mse_loss(hidden @ ps[2].t() + ps[3], y)

    return closed_loop(
        name, kwargs, lambda: [torch.nn.Parameter(t.clone()) for t in init], loss, steps=200
    )


def drift(name, kwargs, seed, n=1000, steps=100):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, generator=gen).bfloat16().float()
    ref_params, params = [torch.nn.Parameter(w0.clone())], [torch.nn.Parameter(w0.bfloat16())]
    ref, opt = _pair(name, ref_params, params, kwargs)
    for _ in range(steps):
        g = torch.randn(n, generator=gen).bfloat16().float() + 0.3
        ref_params[0].grad, params[0].grad = g.clone(), g.bfloat16()
        ref.step()
        opt.step()
    ours = [opt.master_weight(params[0])]
    return _relative(ours, ref_params, w0.double())


def main():
    print("optimizer  problem  worst   mean   (distance / distance fp32 moved)")
    for name in ("AdamW", "Adam", "SGD", "Lion"):
        runs = {
            "linear": [linear(name, kw, s) for kw in LINEAR_INPUTS[name] for s in range(10)],
            "drift": [drift(name, OTHER_KWARGS[name], s) for s in range(5)],
            "mlp": [mlp(name, OTHER_KWARGS[name], s) for s in range(3)],
        }
        for problem, values in runs.items():
            worst, mean = max(values), sum(values) / len(values)
            print(f"{name:9}  {problem:7}  {worst:.3f}  {mean:.3f}", flush=True)


if __name__ == "__main__":
    main()
