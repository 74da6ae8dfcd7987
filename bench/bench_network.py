"""Time one training step of two of the fine models' networks: deep-supervision heads, or decoder kernels.

    python bench/bench_network.py [--compare heads|kernels] [--strides organ|tumor] [--filters 8,16,32,64,64,64]
                                  [--patch 64,64,32] [--batch 2] [--steps 6] [--repeats 3] [--threads 2]

``--compare heads`` (default): MONAI's ``DynUNet``, whose training output stacks every deep-supervision
head upsampled to the full patch (the loss runs 4 times at full resolution), against
``flare23.models.networks.NativeHeadsDynUNet`` (the bundles' training network: each head at its own
size, the reference downsampled to it, as nnU-Net). ``--compare kernels``: ``NativeHeadsDynUNet``
against ``NnDynUNet`` (nnU-Net's decoder kernels; the networks differ only in the full-resolution
decoder block, ``tests/test_networks.py``).

Both networks are tumor_seg's ``network_def`` (read from its ``train.json``: residual blocks, instance
norm, LeakyReLU, deep supervision with 3 heads, the method's kernels [1,3,3] then [3,3,3]) with
``--strides`` and ``--filters`` set, and get the same input and a random label map. A step is
forward, the bundle's training ``loss`` (deep supervision over the weighted Dice + focal loss),
backward and an Adam update: the work of one training iteration without the data loader. The two
networks alternate within each repeat so that a slower or faster phase of a shared machine hits both.

Prints the median over ``--repeats`` of the median step time over ``--steps`` steps (the first step
of each network is a warm-up and not timed), the ratio first / second, the parameter counts, and the
hardware.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from bench_evaluate import hardware  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from monai.bundle import ConfigParser  # noqa: E402

from flare23 import constants  # noqa: E402
from flare23.models.networks import count_parameters  # noqa: E402


def _parser(target, strides, filters):
    """The tumor_seg bundle's ``train.json`` (one source of truth), with ``target``, ``strides`` and ``filters`` set."""
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "bundles", "tumor_seg", "configs", "train.json"))
    parser["network_def#_target_"] = target
    parser["network_def#strides"] = [list(s) for s in strides]
    parser["network_def#upsample_kernel_size"] = [list(s) for s in strides[1:]]
    parser["network_def#filters"] = list(filters)
    return parser


def _steps(net, loss_fn, opt, x, y, steps):
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


COMPARE = {
    "heads": (("DynUNet", "DynUNet"), ("NativeHeadsDynUNet", "flare23.models.networks.NativeHeadsDynUNet")),
    "kernels": (("NativeHeadsDynUNet", "flare23.models.networks.NativeHeadsDynUNet"), ("NnDynUNet", "flare23.models.networks.NnDynUNet")),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", choices=tuple(COMPARE), default="heads")
    ap.add_argument("--strides", choices=("organ", "tumor"), default="organ", help="the organ (default) or tumor pools")
    ap.add_argument("--filters", default="8,16,32,64,64,64", help="stage widths (default: the CPU runs' 8-64)")
    ap.add_argument("--patch", default="64,64,32", help="patch x,y,z (default: the CPU runs' 64,64,32)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    strides = constants.ORGAN_STRIDES_XYZ if args.strides == "organ" else constants.TUMOR_STRIDES_XYZ
    filters = [int(v) for v in args.filters.split(",")]
    patch = tuple(int(v) for v in args.patch.split(","))
    torch.manual_seed(0)
    nets, losses = {}, {}
    for name, target in COMPARE[args.compare]:
        parser = _parser(target, strides, filters)
        nets[name], losses[name] = parser.get_parsed_content("network_def"), parser.get_parsed_content("loss")
        nets[name].train()
    opts = {k: torch.optim.Adam(n.parameters(), 1e-4) for k, n in nets.items()}
    x = torch.randn(args.batch, 1, *patch)
    y = torch.randint(0, constants.NUM_CLASSES, (args.batch, 1, *patch)).float()
    print(f"{args.strides} strides, widths {filters}, patch {patch}, batch {args.batch}, torch threads {args.threads}")
    print(f"hardware: {hardware()}, torch {torch.__version__}")
    runs = {k: [] for k in nets}
    for _ in range(args.repeats):
        for k in nets:
            runs[k].append(_steps(nets[k], losses[k], opts[k], x, y, args.steps))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print("| network | parameters | s per training step (median) | runs |")
    print("|---|---|---|---|")
    for k in nets:
        print(f"| {k} | {count_parameters(nets[k]):,} | {med[k]:.3f} | {', '.join(f'{v:.3f}' for v in runs[k])} |")
    first, second = nets
    print(f"ratio {first} / {second}: {med[first] / med[second]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
