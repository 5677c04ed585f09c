"""``gradsieve-train``: compressed data-parallel training from one command.

Launches its own local workers (``--nproc``, default 2) or, started under ``torchrun``, uses the
ranks it is given. Each compressor of ``--compare`` (or the one ``--compressor``) trains in turn
from the same seed, model initialisation and data split; PyTorch's own hooks (``none``: DDP's
default all-reduce, ``torch-fp16``, ``torch-bf16``, ``powersgd``) run beside gradsieve's compressors as baselines.
With ``--link RATE`` the local workers talk over a rate-limited loopback in a private network
namespace (:mod:`gradsieve.train.link`). At the end rank 0 prints a table with time-to-target and the
speed-ups against dense all-reduce, and writes ``metrics.json``, ``metrics.csv`` and three plots
to ``--out`` (:mod:`gradsieve.train.report`).

This module is the command line; the workers are in :mod:`gradsieve.train.launcher`, one run's loop in
:mod:`gradsieve.train.run`.

Examples::

    gradsieve-train --compare none,fp16,topk,dgc,ef21 --density 0.01
    gradsieve-train --link 100mbit --workload textcls --compare none,torch-fp16,powersgd,topk
    gradsieve-train --workload charlm --model-size base --compressor topk --opt values=int8
    torchrun --nnodes 2 --nproc-per-node 8 ... -m gradsieve.train --workload cifar10 --data-dir /data
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from gradsieve.train import cluster, link
from gradsieve import speculative
from gradsieve.train.baselines import BASELINES, baseline_options, is_baseline
from gradsieve.train.launcher import launch, under_torchrun
from gradsieve.registry import available_compressors, compressor_class, get_compressor
from gradsieve.train.report import Target, report_comparison
from gradsieve.train.run import EXCHANGE_OPTIONS, RunSpec, check_exchange, split_exchange
from gradsieve.train.workloads import (MODEL_SIZES, WORKLOADS, WorkloadError, check_available, defaults_for,
                                 resolve_model_size)

PROG = "gradsieve-train"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``gradsieve-train: error: ...`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Compressed data-parallel training with gradsieve's DDP hook.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", default="digits", choices=WORKLOADS,
                   help="digits: sklearn's 8x8 digits, small CNN; charlm: character transformer on the "
                        "Python standard library's sources; textcls: hashed n-gram classifier whose "
                        "gradient is one large embedding table (communication-bound); linreg: "
                        "heterogeneous linear regression; cifar10: ResNet-18, needs --data-dir")
    p.add_argument("--model-size", default=None,
                   help="model size of the workload (" + "; ".join(
                       f"{w}: {'|'.join(s)}" for w, s in MODEL_SIZES.items() if s) + ")")
    p.add_argument("--compressor", default="topk",
                   help="a registered compressor (" + ", ".join(n for n in available_compressors() if not is_baseline(n))
                        + ") or one of PyTorch's own hooks (" + ", ".join(BASELINES) + "; 'none' is DDP's default "
                        "all-reduce, no hook)")
    p.add_argument("--compare", default=None,
                   help="comma-separated compressors and torch baselines (" + ", ".join(BASELINES)
                        + ") trained in turn from the same "
                        "seed (replaces --compressor); 'none' is DDP's default all-reduce; a variant "
                        "takes options of its own as name:key=value, density included (e.g. "
                        "topk:density=0.02:values=int8 for a same-bytes comparison)")
    p.add_argument("--density", type=float, default=0.01, help="fraction of entries sent (sparse compressors)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="compressor option, repeatable (e.g. values=int8, scope=layer, momentum=0.9; "
                        "powersgd: rank=4, start_iter=N; speculative=true, revert_threshold=X and "
                        "overlap_compress=auto|true|false for speculative training with sparse "
                        "compressors); a key goes to every run "
                        "that accepts it")
    p.add_argument("--warmup-steps", type=int, default=1, help="dense all-reduce steps before compression")
    p.add_argument("--nproc", type=int, default=2,
                   help="local worker processes; with --nodes, ranks per node (ignored under torchrun)")
    p.add_argument("--nodes", type=int, default=1,
                   help="emulated nodes of --nproc ranks each, on this machine: every node a network namespace "
                        "with one NIC of --link RATE each way into a bridge, started by a torchrun of its own "
                        "(needs --link; 'unlimited' for unshaped NICs; root or user namespaces)")
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="auto: nccl with one GPU per rank when GPUs are present, else gloo")
    p.add_argument("--steps", type=int, default=None, help="training steps (default per workload)")
    p.add_argument("--epochs", type=float, default=None, help="epochs over each rank's shard (instead of --steps)")
    p.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default per workload; linreg: full)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default per workload)")
    p.add_argument("--optimizer", default=None, choices=("sgd", "adam"), help="default per workload")
    p.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum (default per workload); for dgc it becomes dgc's momentum correction "
                        "and the optimizer runs without momentum")
    p.add_argument("--heterogeneous", action="store_true",
                   help="skewed data per rank (label mix; separate files for charlm)")
    p.add_argument("--data-dir", default=None, help="dataset folder (cifar10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--link", default=None, metavar="RATE[,delay=D]",
                   help="run the local workers over an emulated link: a private network namespace whose "
                        "loopback the kernel rate-limits (e.g. 10mbit, 100mbit, 1gbit; 'unlimited' for "
                        "the namespace alone). The rate is shared by all workers' traffic. Needs root "
                        "or unprivileged user namespaces")
    p.add_argument("--target", default=None, metavar="METRIC=VALUE",
                   help="goal for time-to-target: accuracy=0.9 (or 90%%) or loss=1.5 on the held-out data "
                        "(default per workload)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="process-group timeout: when a peer stops answering (hung, stopped, "
                        "partitioned), the other ranks fail after this long with an error saying so, "
                        "instead of waiting forever")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N steps (default: a twentieth of the steps); sets time-to-target's "
                        "resolution")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="write checkpoints here (one folder per run, one file per rank; written "
                        "atomically) and each finished run's result")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="save a checkpoint every N steps (needs --checkpoint-dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue each run from the newest checkpoint every rank has in --checkpoint-dir "
                        "(finished runs are not run again; runs without one start from scratch)")
    p.add_argument("--out", default=None, help="output folder (default runs/<workload>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(items: Sequence[str]) -> Dict[str, Any]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--opt must be KEY=VALUE, got {item!r}")
        options[key.strip()] = _parse_value(value.strip())
    return options


def split_compare(text: str) -> List[tuple]:
    """``--compare`` items: ``name`` or ``name:key=value[:key=value...]`` (a variant with options of
    its own, e.g. ``topk:values=int8``). Returns (item, name, options) triples."""
    items = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, *pairs = item.split(":")
        items.append((item, name.strip(), parse_options(pairs) if pairs else {}))
    return items


def plan_runs(args: argparse.Namespace) -> List[RunSpec]:
    """The runs asked for, each validated by the registry (ValueError names what is wrong)."""
    items = split_compare(args.compare) if args.compare else [(args.compressor, args.compressor, {})]
    if not items:
        raise ValueError("--compare must name at least one compressor")
    seen = [item for item, _, _ in items]
    if len(set(seen)) != len(seen):
        raise ValueError(f"--compare names a compressor twice: {args.compare}")
    given = parse_options(args.opt)
    if "density" in given:
        raise ValueError("give the density with --density (or per variant, e.g. "
                         "--compare topk:density=0.02), not with --opt")
    used = set()
    runs = []
    for item, name, own in items:
        if is_baseline(name):
            declared = BASELINES[name].OPTIONS
        else:
            declared = dict(compressor_class(name).OPTIONS)  # ValueError for an unknown name
            if speculative.supports(compressor_class(name)):
                declared.update(speculative.WRAPPER_OPTIONS)
            if not compressor_class(name).traits.dense:
                declared.update({key: None for key in EXCHANGE_OPTIONS})
        unknown = sorted(set(own) - set(declared))
        if unknown:
            raise ValueError(f"--compare {item}: {name} has no option {', '.join(unknown)}; "
                             f"allowed: {', '.join(sorted(declared)) or 'none'}")
        options = {key: value for key, value in given.items() if key in declared}
        used.update(options)
        options.update(own)
        variant = ":".join(f"{k}={v}" for k, v in own.items())
        if is_baseline(name):
            baseline_options(name, options)  # validates values and ranges
            runs.append(RunSpec(name, options, variant))
            continue
        if "density" in declared and "density" not in own:
            options["density"] = args.density
        if "momentum" in declared and "momentum" not in options:
            # dgc: momentum correction replaces SGD's momentum; Adam keeps its own moments, so
            # dgc runs without (momentum twice is what its optimizer check warns about).
            if args.optimizer == "sgd" and args.momentum:
                options["momentum"] = args.momentum
            elif args.optimizer == "adam":
                options["momentum"] = 0.0
        options_left, exchange = split_exchange(options)
        compressor_options, wrapper = speculative.split_options(name, options_left)  # validates the wrapper's
        if wrapper is not None and exchange[0] != "allgather":
            raise ValueError(f"--compare {item}: speculative training needs exchange=allgather, got "
                             f"exchange={options['exchange']}")
        get_compressor(name, **compressor_options)  # validates values and ranges
        check_exchange(name, compressor_options, exchange)
        runs.append(RunSpec(name, options, variant))
    unused = sorted(set(given) - used)
    if unused:
        raise ValueError(f"option(s) {', '.join(unused)} are not accepted by any of "
                         f"{', '.join(name for _, name, _ in items)}")
    return runs


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    args.model_size = resolve_model_size(args.workload, args.model_size)  # WorkloadError names the sizes
    defaults = defaults_for(args.workload, args.model_size)
    for field in ("batch_size", "lr", "optimizer", "momentum"):
        if getattr(args, field) is None:
            setattr(args, field, getattr(defaults, field))
    if args.steps is not None and args.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if args.steps is None and args.epochs is None:
        args.steps = defaults.steps
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.epochs is not None and not args.epochs > 0:
        raise ValueError(f"--epochs must be > 0, got {args.epochs}")
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.warmup_steps < 1:
        raise ValueError(f"--warmup-steps must be >= 1, got {args.warmup_steps}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.momentum < 1:
        raise ValueError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.batch_size < 0:
        raise ValueError(f"--batch-size must be >= 0, got {args.batch_size}")
    if args.batch_size == 0 and args.workload != "linreg":
        raise ValueError("--batch-size 0 (full batch) is only for linreg")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if (args.checkpoint_every is not None or args.resume) and not args.checkpoint_dir:
        raise ValueError("--checkpoint-every and --resume need --checkpoint-dir")
    if args.eval_every is not None and args.eval_every < 1:
        raise ValueError(f"--eval-every must be >= 1, got {args.eval_every}")
    if args.target is None:
        args.target_metric, args.target_value = defaults.target_metric, defaults.target_value
    else:
        target = Target.parse(args.target)
        args.target_metric, args.target_value = target.metric, target.value
    if args.link is not None:
        link.LinkSpec.parse(args.link)  # ValueError on a malformed rate
    cluster.check_layout(args.nodes, args.nproc)
    if args.nodes > 1 and args.link is None:
        raise ValueError("--nodes needs --link RATE, each node's NIC rate (e.g. 1gbit; 'unlimited' for unshaped NICs)")
    if args.out is None:
        args.out = os.path.join("runs", args.workload)
    return args


# ---------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = resolve_args(args)
        runs = plan_runs(args)
        check_available(args.workload, args.data_dir, args.model_size)
        if args.checkpoint_dir and any(spec.compressor == "powersgd" for spec in runs):
            raise ValueError("--checkpoint-dir: torch's PowerSGD hook keeps state gradsieve-train cannot "
                             "checkpoint; leave powersgd out of a checkpointed run")
    except (ValueError, WorkloadError) as err:
        parser.error(str(err))
    in_cluster = cluster.CLUSTER_ENV in os.environ
    if args.nodes > 1 and under_torchrun() and not in_cluster:
        parser.error("--nodes starts its own torchrun per emulated node; under torchrun, leave out --nodes")
    if args.link and not in_cluster:
        spec = link.LinkSpec.parse(args.link)
        if not link.inside():
            if under_torchrun():
                parser.error("--link starts local workers in a shaped namespace; under torchrun, shape "
                             "the network yourself and leave out --link")
            try:
                prefix = link.enter_prefix()
            except link.LinkError as err:
                parser.error(str(err))
            return link.run_inside(argv, prefix)
        if args.nodes > 1:
            print(f"{PROG}: cluster: {args.nodes} nodes of {args.nproc} ranks, each node's NIC {spec.describe_nic()} "
                  f"(tbf on both veth ends, bridge; torchrun per node, c10d rendezvous)", flush=True)
            try:
                ranks_argv = cluster.without_options(argv, ("--nodes", "--nproc", "--link"))
                return cluster.run_cluster(args.nodes, args.nproc, spec, ["-m", "gradsieve.train", *ranks_argv], PROG)
            except link.LinkError as err:
                parser.error(str(err))
        try:
            link.configure(spec)
        except link.LinkError as err:
            parser.error(str(err))
        print(f"{PROG}: link: {spec.describe()} (tbf on lo in a private network namespace, MTU {link.MTU})"
              if spec.rate_bits else f"{PROG}: link: {spec.describe()} (private network namespace, MTU {link.MTU})",
              flush=True)
    return launch(args, runs, report_comparison, PROG)

