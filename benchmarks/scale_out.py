"""Scale-out figures, all measured in one run on this machine (CPU only, gloo between processes):

    python benchmarks/scale_out.py [--steps 12] [--crop 64 64 32 --crop 96 96 96] [--out FILE.json]

(figures also go to ``--out``, by default benchmarks/results/scale_out.json).

1. ZeRO-2 optimiser state per process, 2 processes ÷ 1 (goal ≈ 0.5: each process keeps the Adam moments and the fp32
   master weights of its own half only).  The network of configs/real.yaml takes one real optimiser step under
   ``train.deepspeed=configs/deepspeed/zero2.json``, launched by ``torchrun`` with 1 and then 2 processes; every process
   counts the bytes of the state it holds, the largest over processes is compared.
2. training samples/s with 2 processes ÷ 1 (plain DDP, the same global batch), from the real training command
   (``python train.py`` against ``torchrun --nproc_per_node 2 train.py``) on a small phantom corpus: the
   ``samples_per_s`` the loop logs and the wall-clock time of the whole command.  No goal: on a 2-core CPU the two
   processes share the cores one process would otherwise use with two threads; this shows what process-level scale-out
   costs or buys here, not what it does on one accelerator per process.
3. activation checkpointing (``train.activation_checkpointing``) on configs/real.yaml's network at its crop and at a
   larger one: the bytes forward leaves saved for backward, counted exactly, and the peak resident memory and time of
   a forward + backward in a fresh process per variant.  Saving = 1 − with ÷ without.

Every figure comes from processes this script starts (itself again, in a ``--worker`` mode, or train.py), so no
measurement inherits another's threads, allocator state or peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REAL_CONFIG = REPO / "configs" / "real.yaml"
PHANTOM_CONFIG = REPO / "configs" / "phantom.yaml"
ZERO2_CONFIG = REPO / "configs" / "deepspeed" / "zero2.json"
# Classes of the vocabulary the benchmark network is built for; with cached (random) prompt embeddings, which classes
# they are changes nothing measured here.
BENCH_CLASSES = ("liver", "liver tumor", "spleen", "heart")


# ---------------------------------------------------------------------------------------------------------------------
# helpers shared by the driver and the workers

def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    import torch

    sizes = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            sizes[s.data_ptr()] = s.nbytes()
    return sum(sizes.values())


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _environment() -> dict:
    """The environment every child runs in: this virtualenv first on PATH, DeepSpeed on its CPU backend, and no
    inherited OMP_NUM_THREADS (torchrun then applies its default of one thread per process)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DS_ACCELERATOR"] = "cpu"
    env.pop("OMP_NUM_THREADS", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _torchrun() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _run_together(jobs: list[tuple[list[str], Path, dict | None]], timeout: float) -> list[float]:
    """Run ``(command, log, extra environment)`` jobs side by side from the repository root, each one's output to its
    log; returns their wall-clock seconds, and stops the benchmark on the first failure with the end of its log."""
    started = []
    for cmd, log, env in jobs:
        fh = open(log, "w")
        proc = subprocess.Popen(cmd, cwd=REPO, env=_environment() | (env or {}), stdout=fh, stderr=subprocess.STDOUT)
        started.append((proc, fh, time.perf_counter()))
    walls, failed = [], None
    deadline = time.perf_counter() + timeout
    for (proc, fh, t), (cmd, log, _) in zip(started, jobs):
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        walls.append(time.perf_counter() - t)
        fh.close()
        if code != 0 and failed is None:
            failed = (code, cmd, log)
    if failed is not None:
        code, cmd, log = failed
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"command failed (exit {code}): {' '.join(cmd)}\n--- last lines of {log} ---\n{tail}")
    return walls


def _run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> float:
    return _run_together([(cmd, log, env)], timeout)[0]


def _shown(cmd: list[str]) -> str:
    """A command as a person would type it from the repository root."""
    words = []
    for w in cmd:
        if w == sys.executable:
            w = "python"
        elif w.endswith(f"{os.sep}torchrun"):
            w = "torchrun"
        elif w.startswith(str(REPO) + os.sep):
            w = os.path.relpath(w, REPO)
        words.append(w)
    return " ".join(words)


# ---------------------------------------------------------------------------------------------------------------------
# figure 1: ZeRO-2 optimiser state (worker, one per torchrun process)

def worker_zero2(args) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from vlseg.config import load_config
    from vlseg.models.network import build_network
    from vlseg.train.distributed import (
        finish,
        launched_world,
        make_accelerator,
        micro_batch_size,
        unpartitioned_construction,
    )
    from vlseg.vocab.vocabulary import Vocabulary

    cfg = load_config(str(REAL_CONFIG), [f"train.deepspeed={ZERO2_CONFIG}", "train.mixed_precision=no",
                                         f"train.batch_size={args.batch}"])
    world, rank = launched_world()
    accelerator = make_accelerator(cfg)  # the order train.py uses: accelerator first, then the network
    vocabulary = Vocabulary.load(cfg["vocabulary"]).subset(set(BENCH_CLASSES), source="bench")
    with unpartitioned_construction():
        net, text_encoder = build_network(cfg, vocabulary)
    params = [p for p in net.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=float(cfg["train"]["weight_decay"]))
    net, optimizer = accelerator.prepare(net, optimizer)

    micro = micro_batch_size(cfg, world)
    crop = [int(s) for s in cfg["data"]["crop_size"]]
    gen = torch.Generator().manual_seed(rank)
    device = accelerator.device
    image = torch.randn(micro, 1, *crop, generator=gen).to(device)
    prompts = torch.randn(micro, args.queries, text_encoder.dim, generator=gen).to(device)
    query_mask = torch.ones(micro, args.queries, dtype=torch.bool, device=device)
    net.train()
    out = net(image, prompts, query_mask)
    # Any scalar of both heads gives every trainable parameter a gradient, which is all one real step needs.
    loss = out.mask_logits.float().mean() + out.presence_logits.float().mean()
    accelerator.backward(loss)  # under DeepSpeed this runs the engine's backward and its optimiser step
    optimizer.step()  # accelerate's DeepSpeed wrapper makes these two no-ops; kept as train.py calls them
    optimizer.zero_grad(set_to_none=True)

    # accelerate's DeepSpeedOptimizerWrapper → DeepSpeed's ZeRO optimiser → the torch AdamW it drives, which after
    # ZeRO's set-up steps over this process's flat fp32 partition only.
    zero = getattr(optimizer, "optimizer", optimizer)
    inner = getattr(zero, "optimizer", None)
    if not isinstance(inner, torch.optim.Optimizer):
        raise SystemExit(f"unexpected optimiser layering: {type(optimizer).__name__} → {type(zero).__name__} → "
                         f"{type(inner).__name__}")
    state_tensors, by_key = [], {}
    for st in inner.state.values():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                state_tensors.append(value)
                by_key.setdefault(key, []).append(value)
    master = list(getattr(zero, "single_partition_of_fp32_groups", None) or [])
    flat_model = list(getattr(zero, "bit16_groups_flat", None) or [])
    record = {
        "rank": rank, "world_size": world, "micro_batch": micro, "trainable_params": n_params,
        "optimizer_chain": [type(optimizer).__name__, type(zero).__name__, type(inner).__name__],
        "stepped": all(len(st) > 0 for st in inner.state.values()) and len(inner.state) > 0,
        "partition_numel": sum(p.numel() for g in inner.param_groups for p in g["params"]),
        "adam_moments_bytes": _storage_bytes(state_tensors),
        "adam_moments_by_key": {k: _storage_bytes(v) for k, v in by_key.items()},
        "fp32_master_partition_bytes": _storage_bytes(master),
        "moments_plus_master_bytes": _storage_bytes(state_tensors + master),
        # not optimiser state: ZeRO-2 keeps the whole (flattened) model on every process; shown for scale
        "flat_model_copy_bytes": _storage_bytes(flat_model),
        "padding_numel": [int(p) for p in getattr(zero, "groups_padding", [])],
        "loss": float(loss.detach()),
    }
    gathered = [None] * world if torch.distributed.is_initialized() else [record]
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(gathered, record)
    if rank == 0:
        Path(args.result).write_text(json.dumps(gathered, indent=2))
    finish()  # barrier + destroy_process_group when one exists
    return 0


def figure_zero2(args, tmp: Path) -> dict:
    # Only bytes are measured, so the two launches run side by side (each on its own free port).
    cmds = {n: [*_torchrun(), "--standalone", "--nproc_per_node", str(n), str(Path(__file__).resolve()),
                "--worker", "zero2", "--result", str(tmp / f"zero2_{n}.json"), "--batch", str(args.zero_batch)]
            for n in (1, 2)}
    walls = _run_together([(cmd, tmp / f"zero2_{n}.log", None) for n, cmd in cmds.items()], timeout=400)
    runs = {n: json.loads((tmp / f"zero2_{n}.json").read_text()) for n in cmds}
    commands = {n: _shown(cmd) for n, cmd in cmds.items()}
    print(f"  ZeRO-2 steps with 1 and 2 processes, side by side: {max(walls):.0f} s")
    one, two = runs[1][0], runs[2]
    fig = {"commands": commands, "global_batch": args.zero_batch, "per_rank": {"1": runs[1], "2": two}}
    for key in ("adam_moments_bytes", "moments_plus_master_bytes", "fp32_master_partition_bytes"):
        fig[key] = {"1": one[key], "2_max": max(r[key] for r in two)}
        fig[key]["ratio"] = fig[key]["2_max"] / one[key]
    print(f"\n1. ZeRO-2 optimiser state per process (configs/real.yaml network, {one['trainable_params']:,} trainable "
          f"parameters, one optimiser step, global batch {args.zero_batch}, fp32)")
    print(f"   {'':32s}{'1 process':>14s}{'2 processes (max rank)':>26s}{'ratio':>8s}")
    for key, label in (("adam_moments_bytes", "Adam moments (+ step)"),
                       ("fp32_master_partition_bytes", "fp32 master partition"),
                       ("moments_plus_master_bytes", "moments + fp32 master")):
        f = fig[key]
        print(f"   {label:32s}{_mib(f['1']):>14s}{_mib(f['2_max']):>26s}{f['ratio']:>8.3f}")
    print("   per rank with 2 processes: " + ", ".join(
        f"rank {r['rank']} {_mib(r['moments_plus_master_bytes'])} ({r['partition_numel']:,} elements)" for r in two))
    print(f"   not optimiser state: each process also holds the whole flat model, {_mib(one['flat_model_copy_bytes'])} "
          f"(ZeRO-2 partitions gradients and optimiser state, not parameters)")
    print(f"   optimiser chain: {' → '.join(one['optimizer_chain'])}")
    if not all(r["stepped"] for r in [one, *two]):
        print("   WARNING: some optimiser state is empty after the step: the byte counts above are not meaningful")
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# figure 2: training throughput, 2 processes vs 1 (the real training command)

def figure_throughput(args, tmp: Path) -> dict:
    from vlseg.config import DataSection, load_config
    from vlseg.prepare.phantoms import generate_corpus
    from vlseg.train.corpus import load_training_cases

    manifest = generate_corpus(tmp / "phantoms", n_train=4, n_test=1, shape=(64, 64, 48), spacing=(3.0, 3.0, 3.0),
                               seed=0, progress=False)
    s = int(args.steps)
    common = [f"data.manifest={manifest}", f"output_root={tmp / 'runs'}", f"train.steps={s}", "train.batch_size=4",
              f"train.log_every={s}", "train.checkpoint_every=1000000", "train.mixed_precision=no",
              "train.warmup_steps=1"]
    # Preprocess once here, so neither timed command pays for filling the cache (the second would otherwise find it
    # filled by the first).
    load_training_cases(DataSection.from_config(load_config(str(PHANTOM_CONFIG), common)), "train", progress=False)
    train = [str(REPO / "train.py"), "--no-progress", "--config", str(PHANTOM_CONFIG)]
    variants = {
        "1": [sys.executable, *train, *common, "run_name=p1", "train.threads=2"],
        "2": [*_torchrun(), "--standalone", "--nproc_per_node", "2", *train, *common, "run_name=p2"],
    }
    fig = {"steps": s, "global_batch": 4, "crop_size": load_config(str(PHANTOM_CONFIG))["data"]["crop_size"],
           "runs": {}}
    for n, cmd in variants.items():
        wall = _run(cmd, tmp / f"train_{n}.log", timeout=400)
        lines = (tmp / "runs" / f"p{n}" / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1])
        fig["runs"][n] = {"command": _shown(cmd), "wall_s": wall, "samples_per_s": last["samples_per_s"],
                          "voxels_per_s": last["voxels_per_s"], "peak_memory_mb": last["peak_memory_mb"],
                          "threads_per_process": 2 if n == "1" else 1, "final_loss": last["loss"]}
        print(f"  training with {n} process(es): {wall:.0f} s")
    one, two = fig["runs"]["1"], fig["runs"]["2"]
    fig["samples_per_s_ratio"] = two["samples_per_s"] / one["samples_per_s"]
    fig["wall_ratio"] = two["wall_s"] / one["wall_s"]
    print(f"\n2. training throughput, plain DDP on CPU (phantom corpus, crop {fig['crop_size']}, global batch 4, "
          f"{s} steps, fp32)")
    print(f"   {'':26s}{'samples/s':>11s}{'voxels/s':>12s}{'wall (whole command)':>22s}{'peak RSS/rank':>15s}")
    for n, label in (("1", "1 process × 2 threads"), ("2", "2 processes × 1 thread")):
        r = fig["runs"][n]
        print(f"   {label:26s}{r['samples_per_s']:>11.2f}{r['voxels_per_s'] / 1e6:>10.2f} M{r['wall_s']:>20.1f} s"
              f"{r['peak_memory_mb']:>12.0f} MB")
    print(f"   2 ÷ 1: samples/s {fig['samples_per_s_ratio']:.2f}x, wall-clock time {fig['wall_ratio']:.2f}x")
    print(f"   samples/s is the loop's own figure over all {s} steps of the log window (the first step, with its "
          f"warm-up, included); the wall time adds start-up (imports, the text encoder, process group) and the "
          f"final checkpoint.  torchrun sets OMP_NUM_THREADS=1 per process, so 2 processes × 1 thread are compared "
          f"with 1 process × 2 threads (train.threads=2) on this {os.cpu_count()}-core machine.")
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# figure 3: activation checkpointing (worker, one fresh process per crop and variant)

def _count_saved(net, inputs) -> dict:
    """Bytes a forward pass leaves alive for backward, counted two independent ways on one forward pass.

    * saved-tensor hooks: ``saved_tensors_hooks`` are a stack and autograd calls only the innermost pack hook.  Inside a
      non-reentrant ``torch.utils.checkpoint`` region the checkpoint's own hook is innermost and packs each tensor into
      a placeholder (the tensor is recomputed in backward), so those tensors never reach the hook installed here,
      while the region's inputs, which checkpoint saves before entering its hook, do.  What this hook sees is therefore
      exactly what the graph keeps.  Each storage counts once (by address, with a weak reference so a storage freed
      during forward and its address reused is not counted twice).
    * liveness: a dispatch mode records a weak reference to the storage of every tensor an operator produces during
      forward; after forward (outputs still held, garbage collected) the storages still alive are what forward left in
      memory.  Less the outputs' own storages, it should equal the hook figure: a cross-check that the count is not an
      artefact of how the hooks nest.

    Parameters, buffers and the inputs are excluded from both (they live regardless of checkpointing)."""
    import gc

    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    def ptr(t):
        return t.untyped_storage().data_ptr()

    exclude = {ptr(t) for t in [*net.parameters(), *net.buffers(), *inputs]}
    saved, born = {}, {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            saved[s.data_ptr()] = (s.nbytes(), StorageWeakRef(s))
        return t

    class Births(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    if s.data_ptr() not in exclude and s.data_ptr() not in born:
                        born[s.data_ptr()] = (s.nbytes(), StorageWeakRef(s))
                    elif s.data_ptr() in born and born[s.data_ptr()][1].expired():  # address reused
                        born[s.data_ptr()] = (s.nbytes(), StorageWeakRef(s))
            return out

    net.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Births():
        out = net(*inputs)
    gc.collect()
    alive = lambda d: sum(n for n, ref in d.values() if not ref.expired())  # noqa: E731
    output_ptrs = {ptr(t) for t in out.values()}
    result = {"saved_bytes": alive(saved), "alive_bytes": alive(born),
              "alive_minus_outputs_bytes": alive({p: v for p, v in born.items() if p not in output_ptrs}),
              "output_bytes": _storage_bytes(out.values())}
    del out
    gc.collect()  # the identity pack hook closes reference cycles through the graph
    return result


def worker_actckpt(args) -> int:
    import gc
    import resource

    import psutil
    import torch

    from vlseg.config import load_config
    from vlseg.models.network import build_network
    from vlseg.vocab.vocabulary import Vocabulary

    crop = [int(v) for v in args.crop[0]]
    cfg = load_config(str(REAL_CONFIG), [f"data.crop_size=[{crop[0]}, {crop[1]}, {crop[2]}]"])
    vocabulary = Vocabulary.load(cfg["vocabulary"]).subset(set(BENCH_CLASSES), source="bench")
    net, text_encoder = build_network(cfg, vocabulary)
    text_dim = text_encoder.dim
    del text_encoder  # frozen, outside the network: prompts are random embeddings here
    gc.collect()
    switched = net.set_activation_checkpointing(bool(args.checkpointing))
    net.train()
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(args.batch, 1, *crop, generator=gen),
              torch.randn(args.batch, args.queries, text_dim, generator=gen),
              torch.ones(args.batch, args.queries, dtype=torch.bool))

    def step():
        net.zero_grad(set_to_none=True)
        out = net(*inputs)
        (out.mask_logits.float().mean() + out.presence_logits.float().mean()).backward()

    rss_start = psutil.Process().memory_info().rss
    maxrss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    t = time.perf_counter()
    step()
    first_s = time.perf_counter() - t
    peak_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    counts = {} if args.rss_only else _count_saved(net, inputs)
    record = {"crop": crop, "batch": args.batch, "queries": args.queries, "checkpointing": bool(args.checkpointing),
              "switched": switched, "threads": torch.get_num_threads(),
              "rss_before_bytes": rss_start, "maxrss_before_bytes": maxrss_start,
              "peak_rss_first_step_bytes": peak_first, "peak_rss_bytes": peak,
              "peak_over_start_bytes": peak - rss_start,
              "first_step_s": first_s, "step_s": min(times) if times else first_s, "step_times_s": times, **counts}
    Path(args.result).write_text(json.dumps(record, indent=2))
    return 0


# glibc's malloc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which tensors of
# that size come from the heap and freed ones often stay resident: peak RSS then overstates what was alive at once.
# Pinning the threshold makes every tensor above it its own mapping, returned on free, so RSS follows live tensors.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def figure_actckpt(args, tmp: Path, crops: list[list[int]]) -> dict:
    def command(crop, ckpt: int, rss_only: bool, result: Path) -> list[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "actckpt", "--result", str(result),
               "--crop", *map(str, crop), "--checkpointing", str(ckpt), "--batch", str(args.batch),
               "--queries", str(args.queries), "--reps", str(0 if rss_only else args.reps)]
        return cmd + ["--rss-only"] if rss_only else cmd

    runs, commands = {}, []
    for crop in crops:  # timed: one process at a time, so the two variants see the same machine
        for ckpt in (0, 1):
            result = tmp / f"actckpt_{'x'.join(map(str, crop))}_{ckpt}.json"
            cmd = command(crop, ckpt, False, result)
            wall = _run(cmd, result.with_suffix(".log"), timeout=400)
            runs[tuple(crop), ckpt, False] = json.loads(result.read_text())
            commands.append(_shown(cmd))
            print(f"  activation checkpointing {'on ' if ckpt else 'off'} at {crop}: {wall:.0f} s")
    # Peak memory alone under the pinned mmap threshold: nothing timed, so these run side by side, one thread each
    # (each process's peak is its own, and the network's tensors do not depend on the thread count).
    jobs, keys = [], []
    for crop in crops:
        for ckpt in (0, 1):
            result = tmp / f"actckpt_{'x'.join(map(str, crop))}_{ckpt}_mmap.json"
            cmd = command(crop, ckpt, True, result)
            jobs.append((cmd, result.with_suffix(".log"), FIXED_MMAP | {"OMP_NUM_THREADS": "1"}))
            keys.append((tuple(crop), ckpt, result))
            commands.append("MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 " + _shown(cmd))
    walls = _run_together(jobs, timeout=500)
    print(f"  peak memory with a fixed mmap threshold, {len(jobs)} processes side by side: {max(walls):.0f} s")
    for (crop, ckpt, result) in keys:
        runs[crop, ckpt, True] = json.loads(result.read_text())

    rows = []
    for crop in crops:
        off, on = runs[tuple(crop), 0, False], runs[tuple(crop), 1, False]
        off["peak_over_start_fixed_mmap_bytes"] = runs[tuple(crop), 0, True]["peak_over_start_bytes"]
        on["peak_over_start_fixed_mmap_bytes"] = runs[tuple(crop), 1, True]["peak_over_start_bytes"]
        saving = lambda key: 1 - on[key] / off[key]  # noqa: E731
        rows.append({"crop": crop, "without": off, "with": on,
                     "saved_saving": saving("saved_bytes"), "peak_rss_saving": saving("peak_rss_bytes"),
                     "peak_over_start_saving": saving("peak_over_start_bytes"),
                     "peak_over_start_fixed_mmap_saving": saving("peak_over_start_fixed_mmap_bytes"),
                     "time_ratio": on["step_s"] / off["step_s"]})
    print(f"\n3. activation checkpointing, configs/real.yaml network (U-Net stages + query-decoder layers), batch "
          f"{args.batch}, {args.queries} queries, fp32, {rows[0]['without']['threads']} threads")
    head = ("saved for bwd", "(liveness)", "peak RSS", "peak − start", "(fixed mmap)", "fwd+bwd")
    print(f"   {'crop':14s}{'':6s}" + "".join(f"{h:>14s}" for h in head))
    for r in rows:
        for key, label in (("without", "off"), ("with", "on")):
            v = r[key]
            cells = [_mib(v[k]) for k in ("saved_bytes", "alive_minus_outputs_bytes", "peak_rss_bytes",
                                          "peak_over_start_bytes", "peak_over_start_fixed_mmap_bytes")]
            print(f"   {str(r['crop']):14s}{label:6s}" + "".join(f"{c:>14s}" for c in cells)
                  + f"{v['step_s']:>12.2f} s")
        cells = [f"{r['saved_saving']:.1%}", "", f"{r['peak_rss_saving']:.1%}", f"{r['peak_over_start_saving']:.1%}",
                 f"{r['peak_over_start_fixed_mmap_saving']:.1%}"]
        print(f"   {'':14s}{'saving':6s}" + "".join(f"{c:>14s}" for c in cells) + f"{r['time_ratio']:>12.2f} x")
    print("   saved for bwd: storages autograd keeps after forward (saved-tensor hooks; parameters and inputs "
          "excluded); (liveness): the same counted by weak references to every storage forward created, outputs "
          "excluded, as a cross-check.  peak RSS: ru_maxrss of a fresh process over 1 + "
          f"{args.reps} forward + backward; peak − start: less its resident size just before the first forward; "
          "(fixed mmap): the same in another fresh process (one forward + backward, 1 thread) with "
          "MALLOC_MMAP_THRESHOLD_=65536, where RSS follows live tensors more closely than under glibc's default, "
          "self-raising threshold.  fwd+bwd: the fastest of the "
          f"{args.reps} step(s) after the first (the one least disturbed by other load).")
    return {"rows": rows, "commands": commands}


# ---------------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale_out.json"),
                        help="JSON file the figures are written to (its folder is created)")
    parser.add_argument("--steps", type=int, default=12, help="training steps of each throughput run")
    parser.add_argument("--crop", type=int, nargs=3, action="append",
                        help="crop for the activation-checkpointing figure, repeatable (default: real.yaml's crop "
                             "and 96 96 96)")
    parser.add_argument("--batch", type=int, default=2, help="batch of the activation-checkpointing figure")
    parser.add_argument("--queries", type=int, default=8, help="queries per sample (activation checkpointing, ZeRO)")
    parser.add_argument("--reps", type=int, default=2,
                        help="timed forward + backward steps after the warm-up one (the fastest is reported)")
    parser.add_argument("--zero-batch", type=int, default=2, help="global batch of the ZeRO-2 step (divisible by 2)")
    parser.add_argument("--figures", nargs="+", default=["zero2", "throughput", "actckpt"],
                        choices=["zero2", "throughput", "actckpt"], help="measure only these")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, runs, corpus)")
    parser.add_argument("--worker", choices=["zero2", "actckpt"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rss-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "zero2":
        return worker_zero2(args)
    if args.worker == "actckpt":
        return worker_actckpt(args)

    from vlseg.config import load_config

    if args.zero_batch % 2:
        parser.error("--zero-batch must split over 2 processes")
    crops = args.crop or [[int(v) for v in load_config(str(REAL_CONFIG))["data"]["crop_size"]], [96, 96, 96]]
    tmp = Path(tempfile.mkdtemp(prefix="vlseg-scale-out-"))
    t0 = time.perf_counter()
    import torch

    figures = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0]},
               "command": " ".join(["python", os.path.relpath(Path(__file__).resolve(), REPO),
                                    *(sys.argv[1:] if argv is None else argv)])}
    busy = figures["other_processes_cpu_share"] = {}

    def measured(name: str, fn):
        # The share of the machine's CPU time that went to processes other than this benchmark and its children
        # while a figure was measured: the machine may be shared, and its timings only mean something where this is
        # small.  All CPU time busy on the machine, less this process's and its (waited-for) descendants'.
        import resource

        import psutil

        def ours():
            return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                       for f in ("ru_utime", "ru_stime"))

        def machine():
            c = psutil.cpu_times()
            return sum(getattr(c, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))

        m0, o0, t = machine(), ours(), time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t
        busy[name] = max(0.0, (machine() - m0) - (ours() - o0)) / (wall * (os.cpu_count() or 1))
        return result

    try:
        if "zero2" in args.figures:
            figures["zero2"] = measured("zero2", lambda: figure_zero2(args, tmp))
        if "throughput" in args.figures:
            figures["throughput"] = measured("throughput", lambda: figure_throughput(args, tmp))
        if "actckpt" in args.figures:
            figures["activation_checkpointing"] = measured("actckpt", lambda: figure_actckpt(args, tmp, crops))
    finally:
        if args.keep:
            print(f"(temporary files kept in {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    figures["total_s"] = time.perf_counter() - t0

    summary = []
    if "zero2" in figures:
        z = figures["zero2"]
        summary.append(("ZeRO-2 optimiser state/rank, 2 proc ÷ 1: moments + fp32 master",
                        f"{z['moments_plus_master_bytes']['ratio']:.3f}", "≈ 0.5"))
        summary.append(("  Adam moments only", f"{z['adam_moments_bytes']['ratio']:.3f}", "≈ 0.5"))
    if "throughput" in figures:
        th = figures["throughput"]
        summary.append(("training samples/s, 2 proc ÷ 1 (DDP, CPU)", f"{th['samples_per_s_ratio']:.2f}x",
                        "none on CPU"))
        summary.append(("  wall-clock of the command, 2 proc ÷ 1", f"{th['wall_ratio']:.2f}x", "none on CPU"))
    for r in figures.get("activation_checkpointing", {}).get("rows", []):
        summary.append((f"act. ckpt saving at {r['crop']}: saved-for-backward bytes", f"{r['saved_saving']:.1%}",
                        "none set"))
        summary.append(("  peak RSS (whole process)", f"{r['peak_rss_saving']:.1%}", ""))
        summary.append(("  peak RSS above pre-forward RSS", f"{r['peak_over_start_saving']:.1%}", ""))
        summary.append(("  the same, fixed mmap threshold", f"{r['peak_over_start_fixed_mmap_saving']:.1%}", ""))
        summary.append(("  fwd+bwd time, on ÷ off", f"{r['time_ratio']:.2f}x", "cost of recomputation"))
    figures["summary"] = [{"figure": a, "value": b, "goal": c} for a, b, c in summary]
    width = max(len(a) for a, _, _ in summary) + 2
    print(f"\nsummary ({figures['total_s']:.0f} s in all)")
    print(f"  {'figure':{width}s}{'measured':>10s}   goal")
    for a, b, c in summary:
        print(f"  {a:{width}s}{b:>10s}   {c}")
    print("  share of the machine's CPU taken by other processes while each figure ran: "
          + ", ".join(f"{k} {v:.0%}" for k, v in busy.items())
          + ("  — timings (samples/s, wall, fwd+bwd) are inflated where this is not near 0%; byte counts are not "
             "affected" if max(busy.values(), default=0) > 0.05 else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
