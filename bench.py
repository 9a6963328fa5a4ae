"""
Training throughput of SISA and the parameter-matched Transformer, side by side in one run.

$ python bench.py                                   # the default tiny needle model
$ python bench.py --shape=tiny --dropout=0.2 --half_life=4   # nanoGPT's tiny Shakespeare shape, trained-like decays
$ python bench.py --shape=152m                      # the paper's 152M (SHAPES below lists every shape's flags)
$ torchrun --standalone --nproc_per_node=2 bench.py --shape=152m --attention=sisa   # one model, data-parallel

Each model is timed in a fresh process, so neither inherits the other's compilation caches or
allocator state: the figure is the one the model gets when timed alone. It takes train.py's flags
for the data, the model, the optimizer and the device (a training config file too: its schedule,
evaluation and checkpoint settings are passed over), then its own, from --shape on.
"""
import dataclasses
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare_data
from configurator import autocast, check_values, estimate_mfu, opt, parse_flags, pick_device, pick_dtype
from dataset import Data
from sisa import GPT
from train import TrainConfig, model_config, pick_compile_mode, use_compile


# the shapes people train: flags a --shape sets, unless given too
SHAPES = {
    'tiny': dict(n_layer=6, n_head=6, n_embd=384, d_state=16, block_size=256, batch_size=64, vocab_size=65),
    'tiny1024': dict(n_layer=6, n_head=6, n_embd=384, d_state=16, block_size=1024, batch_size=16, vocab_size=65),
    '152m': dict(n_layer=12, n_head=12, n_embd=768, d_ff=3072, d_state=16, block_size=2048, batch_size=8,
                 vocab_size=50304),
}


@dataclass
class BenchConfig(TrainConfig):
    # train.py's flags that a benchmark on random tokens, at learning rate 0, does not read: not flags here
    unused = ('out_dir', 'init_from', 'eval_interval', 'eval_iters', 'eval_needles', 'always_save_checkpoint',
              'overwrite', 'gradient_accumulation_steps', 'learning_rate', 'max_iters', 'warmup_iters', 'min_lr',
              'sample_tokens', 'lambda_fixed')
    shape: str = opt('', f"'' (the flags as given), or one of {', '.join(SHAPES)}: see SHAPES in bench.py")
    iters: int = opt(20, 'timed steps per model, in 5 windows of iters // 5 steps (at least 1); the median counts')
    repeats: int = opt(1, 'times each model is timed, alternating, each in a fresh process; the median counts')
    half_life: float = opt(0.0, "every SISA head's decay half-life in tokens (0: as initialized, ~100)")
    vocab_size: int = opt(0, "vocabulary of the random tokens (0: the dataset's)")
    profile: bool = opt(False, 'after timing, profile 5 steps of each model: top kernels, GPU time by kind')

    def __post_init__(self):
        super().__post_init__()
        check_values(self, positive=('iters', 'repeats'), non_negative=('half_life', 'vocab_size'),
                     choices=dict(shape=('',) + tuple(SHAPES)))


def time_steps(cfg, vocab):
    """Median time of full training steps (forward, backward, clipping, AdamW) of one model,
    over 5 windows after 5 warm-up steps (compilation included). The learning rate is 0, so
    the decays stay where they were set. Under torchrun every process takes its own batch
    and DDP averages the gradients, as in training; tok_s counts the tokens of all of them."""
    device = pick_device(cfg.device)
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if 'RANK' in os.environ:
        if device.type == 'cuda':
            device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
            torch.cuda.set_device(device)
        init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    dtype = pick_dtype(cfg.dtype, device)
    ctx = autocast(device, dtype)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, vocab)).to(device)
    if cfg.half_life and cfg.attention == 'sisa':
        for block in model.transformer.h:  # w_a = 0 at init: every token decays by softplus(b_a)
            block.attn.a_bias.data.fill_(math.log(math.expm1(math.log(2) / cfg.half_life)))
    optimizer = model.configure_optimizers(cfg.weight_decay, 0.0, (cfg.beta1, cfg.beta2), device.type)
    mode = pick_compile_mode(cfg, device)
    run = torch.compile(model, mode=mode) if use_compile(cfg, device) else model
    if world > 1:
        run = DDP(run, device_ids=[device.index] if device.type == 'cuda' else None)
    x = torch.randint(vocab, (cfg.batch_size, cfg.block_size), device=device,
                      generator=torch.Generator(device).manual_seed(cfg.seed + rank))

    def step():
        # as train.py: under CUDA graphs, the last step's outputs are done with
        torch.compiler.cudagraph_mark_step_begin()
        with ctx:
            _, loss = run(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    graphs = use_compile(cfg, device) and mode != 'default'
    if device.type == 'cuda' and graphs:  # CUDA graphs take their memory while recorded, in the warm-up
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(5):
        step()
    sync()
    if device.type == 'cuda' and not graphs:
        torch.cuda.reset_peak_memory_stats(device)
    windows = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(max(1, cfg.iters // 5)):
            step()
        sync()
        windows.append((time.perf_counter() - t0) / max(1, cfg.iters // 5))
    dt = float(np.median(windows))
    tok_s = world * cfg.batch_size * cfg.block_size / dt
    table = profile(step, sync, device) if cfg.profile else None
    if 'RANK' in os.environ:
        torch.distributed.barrier()
        destroy_process_group()
    return dict(params=model.get_num_params(), tok_s=tok_s, step_ms=dt * 1000, rank=rank, world=world,
                windows='/'.join(f'{w * 1000:.1f}' for w in windows),
                mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None,
                mfu=estimate_mfu(model, tok_s / world, device, dtype), profile=table)


def profile(step, sync, device, steps=5):
    """torch.profiler's table of the kernels (or CPU ops) that take the most time over `steps` steps,
    and on CUDA the GPU time a step by kind of kernel (kernel_kinds)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    key = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    table = f'{steps} steps:\n' + prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
    if device.type == 'cuda':
        kinds = kernel_kinds([(e.name, e.device_time) for e in prof.events()
                              if e.device_type == torch.autograd.DeviceType.CUDA], steps)
        table += (f'GPU time a step, {sum(kinds.values()):,.0f} us: '
                  + ', '.join(f'{kind} {us:,.0f}' for kind, us in kinds.items()) + '\n')
    return table


# the kinds of kernel a step's GPU time is summed by: the first pattern that a kernel's name matches
KERNEL_KINDS = [("SISA's attention", r'^_(forward|backward_dq|backward_dkdv|dropout_bits)$'),
                ("SISA's channels", r'^_(channels_\w+|cumsum)$'),
                ("inductor's fused kernels", r'^triton_'),  # before SDPA's: their names can hold 'attention'
                ("SDPA's attention", r'cudnn|flash|fmha|attention'),
                ('matrix products', r'gemm|nvjet|cutlass|xmma|splitK'),
                ('optimizer', r'multi_tensor|foreach|adam')]


def kernel_kinds(kernels, steps):
    """Microseconds a step by kind (KERNEL_KINDS, else 'other'), largest first, from (kernel name, microseconds)."""
    out = {}
    for name, us in kernels:
        kind = next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name)), 'other')
        out[kind] = out.get(kind, 0.0) + us / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def benchmark(cfg):
    if cfg.shape:
        given = getattr(cfg, 'given', frozenset())
        cfg = dataclasses.replace(cfg, **{k: v for k, v in SHAPES[cfg.shape].items() if k not in given})
    device = pick_device(cfg.device)
    vocab = cfg.vocab_size or Data(cfg).meta['vocab_size']
    half_life = f'half-life {cfg.half_life:g} tokens' if cfg.half_life else 'decays at init'
    if int(os.environ.get('RANK', 0)) == 0:
        name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
        how = 'compiled, ' + pick_compile_mode(cfg, device) if use_compile(cfg, device) else 'eager'
        print(f'{device} ({name}), torch {torch.__version__}, {pick_dtype(cfg.dtype, device)}, {how}, '
              f'batch {cfg.batch_size} x {cfg.block_size}, {cfg.n_layer} x {cfg.n_embd}, d_state {cfg.d_state}, '
              f'vocab {vocab}, SISA kernel {cfg.kernel}, dropout {cfg.dropout:g}, {half_life}')
    if 'RANK' in os.environ:  # torchrun: the one model of --attention, data-parallel, timed in these processes
        r = time_steps(cfg, vocab)
        if r['rank'] == 0:
            print(f"{cfg.attention}: {r['world']} processes x batch {cfg.batch_size}: {r['tok_s']:,.0f} tok/s in all, "
                  f"{r['step_ms']:.1f} ms/step (windows {r['windows']} ms), MFU per GPU "
                  + ('n/a' if r['mfu'] is None else f"{r['mfu']:.1%}"))
        return {cfg.attention: r}
    runs = {'sisa': [], 'softmax': []}
    for _ in range(cfg.repeats):  # alternating: a host that drifts (tiny shapes are bound by it) drifts for both
        for attention in runs:
            with torch.multiprocessing.get_context('spawn').Pool(1) as pool:
                r = pool.apply(time_steps, (dataclasses.replace(cfg, attention=attention), vocab))
            runs[attention].append(r)
            mem = 'n/a' if r['mem_gib'] is None else f"{r['mem_gib']:.2f} GiB"
            mfu = 'n/a' if r['mfu'] is None else f"{r['mfu']:.1%}"
            print(f"{attention:>8}: {r['params'] / 1e6:.2f}M params, {r['tok_s']:,.0f} tok/s, "
                  f"{r['step_ms']:.1f} ms/step (windows {r['windows']} ms), peak {mem}, MFU {mfu}")
            if r['profile']:
                print(r['profile'])
    results = {a: sorted(rs, key=lambda r: r['tok_s'])[len(rs) // 2] for a, rs in runs.items()}  # the median run
    s, t = results['sisa'], results['softmax']
    memory = f"{s['mem_gib'] / t['mem_gib']:.3f}x" if s['mem_gib'] else 'n/a'
    print(f"SISA/Transformer: throughput {s['tok_s'] / t['tok_s']:.3f}x, memory {memory} "
          f"(MFU counts 6N + 6 n_layer n_head block_size (2 d_h + d_s) FLOPs per token; d_s = 0 for softmax)")
    if cfg.repeats > 1:
        ratios = [a['tok_s'] / b['tok_s'] for a, b in zip(runs['sisa'], runs['softmax'])]
        print(f"median of {cfg.repeats} timings each; "
              f"the ratio in each repeat: {min(ratios):.3f}x to {max(ratios):.3f}x")
    return results


def main(argv):
    cfg = parse_flags(BenchConfig, argv, __doc__)
    try:
        benchmark(cfg)
    except (prepare_data.DataError, ValueError) as e:
        sys.exit(f'error: {e}')
    except KeyboardInterrupt:
        sys.exit('interrupted')


if __name__ == '__main__':
    main(sys.argv[1:])
