"""
Train a small SISA model (or, with --attention=softmax, the parameter-matched Transformer).

$ python train.py                                   # needle-in-a-haystack, offline, minutes on a laptop CPU
$ python train.py --attention=softmax --out_dir=out-softmax   # the same run with plain attention
$ python train.py config/shakespeare_char.py      # nanoGPT's tiny Shakespeare model, a GPU's run (_cpu.py: a CPU's)
$ python train.py config/recall.py                   # associative recall, answers scored (dataset.py)
$ python train.py --init_from=resume --max_iters=8000   # continue out/ckpt.pt (its cosine redrawn to 8000)
$ torchrun --standalone --nproc_per_node=4 train.py --gradient_accumulation_steps=4  # several GPUs (DDP)

compare.py trains both models over several seeds and prints a table; bench.py times them.
Every setting below is a --name=value flag, and a bare --flag is True for a boolean
(python train.py --help lists them); a config file in nanoGPT's style
(python train.py config.py --flag=...) may set them too.
"""
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass

import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import prepare_data
from configurator import (DTYPES, autocast, check_values, convert, estimate_mfu, opt, parse_flags, pick_device,
                          pick_dtype)
from dataset import evaluate, load_data, print_sample, report
from sisa import GPT, GPTConfig, fused_kernel


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = opt('out', 'checkpoint, log.jsonl and sample go here')
    init_from: str = opt('scratch', "'scratch' or 'resume' (from out_dir/ckpt.pt)")
    eval_interval: int = opt(250, 'evaluate every this many steps')
    eval_iters: int = opt(10, 'batches per loss estimate')
    eval_needles: int = opt(200, 'held-out needle prompts per evaluation (copy corpus: probes per length)')
    always_save_checkpoint: bool = opt(True, 'save at every evaluation (False: only when val loss improves)')
    overwrite: bool = opt(False, "start afresh in an out_dir that holds another run's checkpoint, replacing it")
    # data
    dataset: str = opt('needle', "folder under data/: 'needle' (prepared if missing), 'shakespeare_char', ...; "
                                 "or 'recall', 'recall_forget' (associative recall, made on the fly)")
    batch_size: int = opt(32, 'sequences per micro-step')
    gradient_accumulation_steps: int = opt(1, 'micro-steps per optimizer step')
    block_size: int = opt(64, 'context length (the needle documents are up to 64 characters)')
    recall_vocab: int = opt(4096, "recall's tokens: keys in the lower half, values in the upper (0 is the blank)")
    # model
    n_layer: int = opt(2, 'layers')
    n_head: int = opt(8, 'heads (more heads found the retrieval sooner in tiny runs)')
    n_embd: int = opt(64, 'model width')
    d_state: int = opt(4, 'SSM channel width per head (even; 4 at this tiny width: 16 would cost 62% of the FFN)')
    attention: str = opt('sisa', "'sisa' or 'softmax' (the parameter-matched Transformer)")
    d_ff: int = opt(0, "the Transformer's SwiGLU width (0: 8 n_embd / 3 rounded up to 8); SISA's shrinks to match")
    kernel: str = opt('auto', "SISA attention: 'auto' (fused Triton kernel on CUDA), 'triton' or 'sdpa'")
    dropout: float = opt(0.0, 'dropout')
    bias: bool = opt(False, 'bias in Linear layers')
    lambda_fixed: bool = opt(False, 'SISA: freeze lambda at its init, 0.31 (ablation: fixed vs learned)')
    sisa_offset: str = opt('exact', "SISA: 'exact', or 'paper': the paper's clamped offset (ablation; not causal)")
    short_conv: int = opt(0, 'width of a causal convolution before each attention, both models (Zoology recall: 3)')
    # optimizer: AdamW, linear warmup then cosine decay
    learning_rate: float = opt(3e-3, 'peak learning rate')
    max_iters: int = opt(5000, 'optimizer steps')
    weight_decay: float = opt(0.0, 'on weights of 2+ dims (0 here: in tiny needle runs decay delayed retrieval)')
    beta1: float = opt(0.9, 'AdamW beta1')
    beta2: float = opt(0.95, 'AdamW beta2')
    grad_clip: float = opt(1.0, 'clip the gradient norm at this value (0: off)')
    warmup_iters: int = opt(100, 'linear warmup steps')
    min_lr: float = opt(3e-4, 'learning rate at the end of the cosine')
    # system
    device: str = opt('auto', "'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'")
    dtype: str = opt('auto', "'auto' (bf16 on CUDA, fp16 where bf16 is unsupported, else fp32), "
                             "'float32', 'bfloat16', 'float16'")
    compile: str = opt('auto', "torch.compile: 'auto' (on CUDA), True or False")
    compile_mode: str = opt('auto', "torch.compile's mode: 'auto' (CUDA graphs where they are safe: see "
                                    "pick_compile_mode), 'default', 'reduce-overhead' (CUDA graphs) or 'max-autotune'")
    seed: int = opt(1337, 'one seed for init and data order, so runs differ only in what you change')
    sample_tokens: int = opt(120, 'tokens to sample at the end (0: none)')

    # nanoGPT's settings that have no flag here, for its users and config files: what happens here instead
    nanogpt = dict(
        log_interval='a progress bar shows the loss (into a file, a line every 30 s); each evaluation prints a line',
        wandb_log='each evaluation goes to out_dir/log.jsonl, which plot.py draws',
        wandb_project='the log is out_dir/log.jsonl', wandb_run_name='the log is out_dir/log.jsonl',
        backend="torchrun's processes use nccl on CUDA, gloo on the CPU",
        lr_decay_iters='the cosine decays over --max_iters',
        decay_lr='the learning rate warms up, then decays by a cosine (for a flat one: --min_lr equal to '
                 '--learning_rate, --warmup_iters=0)',
        eval_only='sample.py answers held-out needle questions from a checkpoint; training evaluates each '
                  '--eval_interval')
    nanogpt_as_here = dict(decay_lr=True, eval_only=False)  # another value would ask for another run: an error

    def __post_init__(self):
        self.dtype = DTYPES.get(self.dtype, self.dtype)
        check_values(self, positive=('batch_size', 'gradient_accumulation_steps', 'block_size', 'n_layer', 'n_head',
                                     'n_embd', 'd_state', 'eval_interval', 'eval_iters'),
                     non_negative=('max_iters', 'eval_needles', 'sample_tokens', 'learning_rate', 'min_lr',
                                   'weight_decay', 'warmup_iters', 'grad_clip', 'd_ff'),
                     choices=dict(init_from=('scratch', 'resume'), attention=('sisa', 'softmax'),
                                  kernel=('auto', 'triton', 'sdpa'), sisa_offset=('exact', 'paper'),
                                  dtype=('auto', 'float32', 'bfloat16', 'float16'),
                                  compile=('auto', 'True', 'False', 'true', 'false', '1', '0'),
                                  compile_mode=('auto', 'default', 'reduce-overhead', 'max-autotune')))
        if not 0 <= self.dropout < 1:
            raise ValueError(f'--dropout must be in [0, 1), got {self.dropout}')
        accumulates = self.gradient_accumulation_steps > int(os.environ.get('WORLD_SIZE', 1))
        if self.compile_mode not in ('auto', 'default') and accumulates:
            raise ValueError(f'--compile_mode={self.compile_mode} (CUDA graphs) loses or refuses accumulated '
                             f'gradients (torch 2.11): use --compile_mode=default, or a larger --batch_size')


# -----------------------------------------------------------------------------
# set-up: model, checkpoints, processes

def lr_at(it, cfg):
    """Linear warmup (never 0 at step 0), then cosine decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def model_config(cfg, vocab_size):
    return GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, d_state=cfg.d_state,
                     attention=cfg.attention, dropout=cfg.dropout, bias=cfg.bias, d_ff=cfg.d_ff,
                     kernel=cfg.kernel, sisa_offset=cfg.sisa_offset, short_conv=cfg.short_conv)


def use_compile(cfg, device):
    return device.type == 'cuda' if cfg.compile == 'auto' else convert('compile', cfg.compile, bool)


def pick_compile_mode(cfg, device):
    """torch.compile's mode. 'auto' takes CUDA graphs ('reduce-overhead': each step's kernel launches
    replayed without Python, which bounds a tiny model's step) where they are known to work: on CUDA,
    in one process (DDP under them is untested), without gradient accumulation (torch loses
    accumulated gradients under them), for the Transformer and the fused kernel (the chunked SDPA
    form reads its chunk count on the host; the paper's offset has not run under them). Elsewhere
    'default'."""
    if cfg.compile_mode != 'auto':
        return cfg.compile_mode
    graphs = (device.type == 'cuda' and cfg.gradient_accumulation_steps == 1 and 'RANK' not in os.environ
              and (cfg.attention == 'softmax' or cfg.sisa_offset == 'exact' and fused_kernel(cfg.kernel, device)))
    return 'reduce-overhead' if graphs else 'default'


CHECKPOINT_KEYS = {'model', 'model_args', 'meta'}  # what every reader of a checkpoint takes from it


def out_dir_flag(out_dir):
    """' --out_dir=...' for a hint that names a command, or '' for the default folder."""
    return '' if out_dir == TrainConfig.out_dir else f' --out_dir={shlex.quote(out_dir)}'


def load_checkpoint(path):
    if not os.path.exists(path):
        raise prepare_data.DataError(f'no checkpoint at {path}; train one first with python train.py'
                                     + out_dir_flag(os.path.dirname(os.path.normpath(path)) or '.'))
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise prepare_data.DataError(f'{path} is not a checkpoint that train.py wrote, or it was cut short '
                                     f'({type(e).__name__})')
    missing = CHECKPOINT_KEYS - set(ckpt) if isinstance(ckpt, dict) else CHECKPOINT_KEYS
    if missing:  # nanoGPT's checkpoints, say, have no data meta and other model settings
        raise prepare_data.DataError(f"{path} is not a checkpoint that train.py wrote "
                                     f"(no {', '.join(sorted(missing))})")
    return ckpt


def clean_state_dict(state):
    # a compiled model's keys carry an '_orig_mod.' prefix; strip it so any model loads them
    return {k.removeprefix('_orig_mod.'): v for k, v in state.items()}


def load_model(ckpt, kernel='auto'):
    """The model a checkpoint holds, on the CPU, for kernel (where it runs now, not where it trained)."""
    try:
        model = GPT(GPTConfig(**{**ckpt['model_args'], 'kernel': kernel}))
        model.load_state_dict(clean_state_dict(ckpt['model']))
    except (TypeError, RuntimeError) as e:  # settings or weights of another model
        why = ' '.join(str(e).split())[:300]
        raise prepare_data.DataError(f"the checkpoint's model does not load into sisa.py's GPT: {why}")
    return model


def save_checkpoint(path, ckpt):
    tmp = path + '.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the old checkpoint or the new one, never half of one


def compiled_or_eager(model, batch, ctx, mode='default'):
    """torch.compile(model), tried on one forward and backward, since compilation happens at the
    first call; where it fails (Windows, some Pythons, MPS) training goes on uncompiled."""
    try:
        compiled = torch.compile(model, mode=mode, dynamic=False)  # recall's few lengths: a graph each
        with ctx:
            _, loss = compiled(*batch)
        loss.backward()
        return compiled
    except Exception as e:
        first_line = str(e).splitlines()[0][:100]
        print(f'warning: torch.compile failed ({type(e).__name__}: {first_line}); training uncompiled')
        return model
    finally:
        model.zero_grad(set_to_none=True)


@torch.no_grad()
def warm_up_evaluation(model, batch, ctx):
    """One forward of the uncompiled model, as evaluate runs it (no dropout), before the clock starts, so that
    the kernels it needs compile here and not in the first evaluation, which the loop's tokens per second
    count: SISA's fused kernel without dropout is a kernel of its own, compiled at its first call."""
    model.eval()
    try:
        with ctx:
            model(*batch)
    finally:
        model.train()


def init_model(cfg, ckpt, vocab_size, device):
    """Model and AdamW, fresh or from the checkpoint; lambda frozen for --lambda_fixed."""
    model = load_model(ckpt, cfg.kernel) if ckpt else GPT(model_config(cfg, vocab_size))
    model.to(device)
    for block in model.transformer.h:
        if block.attn.sisa and cfg.lambda_fixed:
            block.attn.lambda_raw.requires_grad_(False)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    if ckpt:
        optimizer.load_state_dict(ckpt['optimizer'])
    return model, optimizer


def start_processes(cfg):
    """(rank, world, device). Under torchrun: one process per device, nccl between GPUs, gloo between CPUs."""
    device = pick_device(cfg.device)
    if 'RANK' not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if device.type == 'cuda':
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
        torch.cuda.set_device(device)
    if cfg.gradient_accumulation_steps % world:
        raise ValueError(f'--gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of '
                         f'the {world} processes: each runs gradient_accumulation_steps / {world} micro-steps')
    init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device


# settings a resumed run cannot change: its weights and optimizer state were made with them
RUN_FIXED = {'dataset', 'n_layer', 'n_head', 'n_embd', 'd_state', 'attention', 'd_ff', 'bias', 'block_size',
             'sisa_offset', 'lambda_fixed', 'recall_vocab', 'short_conv'}


def resumed(cfg, ckpt_path):
    """(cfg, ckpt): a resumed run's checkpoint, and its settings but for the flags given now."""
    if cfg.init_from == 'scratch':
        if os.path.exists(ckpt_path) and not cfg.overwrite:
            raise ValueError(f'{ckpt_path} holds a run already: continue it with --init_from=resume, start this one '
                             f'elsewhere with --out_dir=..., or replace it with --overwrite')
        return cfg, None
    ckpt = load_checkpoint(ckpt_path)
    given = getattr(cfg, 'given', frozenset())
    for name in sorted(given & RUN_FIXED):
        was = ckpt['config'].get(name, ckpt['model_args'].get(name))
        if getattr(cfg, name) != was:
            raise ValueError(f'--{name}={getattr(cfg, name)} differs from the run in {ckpt_path} ({name}={was}): '
                             f'a resumed run keeps its model and data; start a new one with another --out_dir')
    keep = {f.name for f in dataclasses.fields(cfg)} - given - {'init_from', 'out_dir'}
    return dataclasses.replace(cfg, **{k: v for k, v in ckpt['config'].items() if k in keep}), ckpt


def trim_log(log_path, last_iter):
    """Keep the evaluations up to last_iter, the step a resumed run starts from (-1: a new run, none):
    a checkpoint that kept an earlier best val step leaves later lines behind, which the run redoes."""
    if not os.path.exists(log_path):
        return
    def kept(line):
        try:
            return json.loads(line)['iter'] <= last_iter
        except (ValueError, KeyError, TypeError):  # a line cut short by a killed run
            return False
    lines = [line for line in open(log_path) if kept(line)]
    with open(log_path, 'w') as f:
        f.writelines(lines)


def check_out_dir(out_dir, rank):
    try:  # fail now, not after an evaluation interval of training
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f'.write_test_{rank}')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f'--out_dir={out_dir} cannot be written: {e.strerror}')


class CtrlC:
    """Ctrl-C: finish the step in flight, save (unless the checkpoint is kept for the best val loss), exit:
    never mid-update, never a half-written file.
    Under torchrun every process gets the signal, or one does: they agree each step (all_reduce)."""

    def __init__(self, ddp, device):
        self.ddp, self.device, self.pressed = ddp, device, False
        self.old = signal.signal(signal.SIGINT, self.press)

    def press(self, *_):
        self.pressed = True

    def stopping(self):
        if not self.ddp:
            return self.pressed
        flag = torch.tensor([float(self.pressed)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        agreed = flag.item() > 0
        self.pressed |= agreed  # never cleared: a signal that lands during the all_reduce counts next step
        return agreed

    def restore(self):
        signal.signal(signal.SIGINT, self.old)


# -----------------------------------------------------------------------------
# training

def optimizer_step(model, optimizer, scaler, batches, ctx, lr, grad_clip):
    """Forward and backward over the micro-batches, clip, step: one update, from the mean gradient.
    Returns the last micro-batch's loss, a tensor: reading it waits for the GPU."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: a new step; the last one's outputs are done with
    for micro, (x, y) in enumerate(batches):
        if isinstance(model, DDP):  # sync gradients on the last micro-step only
            model.require_backward_grad_sync = micro == len(batches) - 1
        with ctx:
            _, loss = model(x, y)
            loss = loss / len(batches)
        scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss * len(batches)


def save_run(path, raw_model, optimizer, cfg, data, iter_num, best_val_loss):
    """Everything a resumed run needs, and what sample.py reads (CHECKPOINT_KEYS)."""
    save_checkpoint(path, dict(model=clean_state_dict(raw_model.state_dict()), optimizer=optimizer.state_dict(),
                               model_args=dataclasses.asdict(raw_model.config), iter_num=iter_num,
                               best_val_loss=best_val_loss, config=dataclasses.asdict(cfg), meta=data.meta))


def train(cfg, quiet=False):
    """Train as cfg says; returns the list of evaluations (also appended to out_dir/log.jsonl)."""
    rank, world, device = start_processes(cfg)
    ddp, master = 'RANK' in os.environ, rank == 0
    # The run is the same run on any number of processes: step s has micro-batches
    # s * G ... s * G + G - 1 (G = gradient_accumulation_steps), and rank r takes the r-th
    # run of G / world of them. DDP averages the ranks' gradients, each the mean of its micro-steps.
    micro_steps = cfg.gradient_accumulation_steps // world
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    cfg, ckpt = resumed(cfg, ckpt_path)
    if ckpt and ckpt['iter_num'] >= cfg.max_iters:
        print(f"nothing to do: {ckpt_path} is at step {ckpt['iter_num']} and --max_iters is {cfg.max_iters}; "
              f"give a larger --max_iters to go on")
        return []
    if cfg.attention == 'sisa':
        fused_kernel(cfg.kernel, device)  # --kernel=triton where it cannot run: say so before building
    data = load_data(cfg, rank)  # a missing dataset stops the run before it makes out_dir
    check_out_dir(cfg.out_dir, rank)
    dtype = pick_dtype(cfg.dtype, device)
    ctx = autocast(device, dtype)

    raw_model, optimizer = init_model(cfg, ckpt, data.meta['vocab_size'], device)
    iter_num, best_val_loss = (ckpt['iter_num'], ckpt['best_val_loss']) if ckpt else (0, float('inf'))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == 'float16')  # fp16 needs loss scaling; bf16 does not
    model = raw_model
    if use_compile(cfg, device):
        model = compiled_or_eager(raw_model, data.batch('train', 0, device), ctx, pick_compile_mode(cfg, device))
    if master:
        warm_up_evaluation(raw_model, data.batch('val', 0, device, stream=1), ctx)
    how = 'eager' if model is raw_model else f'compiled ({pick_compile_mode(cfg, device)})'
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if master and not quiet:
        print(f'{raw_model.config.attention}: {raw_model.get_num_params():,} parameters, {device} {dtype}, '
              f'{tokens_per_iter:,} tokens per step, {how}')

    ctrl_c = CtrlC(ddp, device)
    history, log_path = [], os.path.join(cfg.out_dir, 'log.jsonl')
    if master:
        trim_log(log_path, ckpt['iter_num'] if ckpt else -1)
    # a bar on a terminal; into a file (a log, nohup, a cluster's job) a plain line every 30 s instead of
    # redraws by carriage return, which pile up on one line there
    lines = master and not quiet and not sys.stderr.isatty()
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=not master or quiet or lines, dynamic_ncols=True)
    t0, eval_time, tokens_seen, saved, first_iter, said = time.time(), 0.0, 0, None, iter_num, 0.0
    while True:
        last = iter_num >= cfg.max_iters
        resumed_here = ckpt and iter_num == ckpt['iter_num']  # a resumed run's first step: not evaluated again
        if master and (iter_num % cfg.eval_interval == 0 and not resumed_here or last):
            if device.type == 'cuda':
                torch.cuda.synchronize()  # the steps in flight are training's time, not the evaluation's
            t_eval = time.time()
            ev = evaluate(raw_model, data, cfg, device, ctx)
            history.append(dict(iter=iter_num, lr=lr_at(iter_num, cfg), **ev, time=round(time.time() - t0, 1)))
            with open(log_path, 'a') as f:
                f.write(json.dumps(history[-1]) + '\n')
            if not quiet:
                report(history[-1], bar)
            if ev['val_loss'] < best_val_loss or cfg.always_save_checkpoint:
                best_val_loss = min(best_val_loss, ev['val_loss'])
                if iter_num > 0:
                    save_run(ckpt_path, raw_model, optimizer, cfg, data, iter_num, best_val_loss)
                    saved = iter_num
            eval_time += time.time() - t_eval  # the saving too
        if last or ctrl_c.stopping():
            break

        first = iter_num * cfg.gradient_accumulation_steps + rank * micro_steps  # this process's first micro-batch
        batches = [data.batch('train', first + micro, device) for micro in range(micro_steps)]
        loss = optimizer_step(model, optimizer, scaler, batches, ctx, lr_at(iter_num, cfg), cfg.grad_clip)
        iter_num += 1
        tokens_seen += tokens_per_iter
        if master and (iter_num % 10 == 0 or iter_num == first_iter + 1):
            rate = tokens_seen / (time.time() - t0 - eval_time)  # training's rate, evaluations left out
            mfu = estimate_mfu(raw_model, rate / world, device, dtype)
            known = {} if mfu is None else dict(mfu=f'{mfu:.1%}')  # None: no peak FLOP/s known for this device
            bar.set_postfix(loss=f'{loss.item():.4f}', tok_s=f'{rate:,.0f}', **known, refresh=False)
        if lines and (iter_num in (first_iter + 1, cfg.max_iters) or time.time() - said > 30):
            said, spent = time.time(), time.time() - t0
            left = (spent - eval_time) / (iter_num - first_iter) * (cfg.max_iters - iter_num)  # evaluations aside
            print(f'step {iter_num}/{cfg.max_iters}: loss {loss.item():.4f}, {rate:,.0f} tok/s, '
                  f'{tqdm.format_interval(spent)} elapsed, {tqdm.format_interval(left)} of steps left', flush=True)
        bar.update(1)
    bar.close()
    ctrl_c.restore()
    resume = f'train.py --init_from=resume{out_dir_flag(cfg.out_dir)}'
    best_kept = not cfg.always_save_checkpoint and (saved is not None or ckpt is not None)
    if master and ctrl_c.pressed and best_kept:  # the checkpoint keeps the best val's weights, as asked
        print(f'interrupted at step {iter_num}: {ckpt_path} keeps step {ckpt["iter_num"] if saved is None else saved} '
              f'(--always_save_checkpoint=False saves only a better val loss); continue from there with {resume}')
    elif master and ctrl_c.pressed:  # (a run that finished was saved by its last evaluation)
        save_run(ckpt_path, raw_model, optimizer, cfg, data, iter_num, best_val_loss)
        print(f'interrupted: saved step {iter_num} to {ckpt_path}; continue it with {resume}')
    elif master and not quiet and saved not in (None, iter_num):  # --always_save_checkpoint=False
        print(f'{ckpt_path} holds step {saved}, whose val loss {best_val_loss:.4f} no later step beat')
    if master and cfg.sample_tokens and not quiet and not ctrl_c.pressed:
        print_sample(raw_model, data, device, ctx, cfg.sample_tokens)
    if ddp:  # leave together: rank 0 may still be saving, and a rank that tears down early can abort a peer
        torch.distributed.barrier()
        destroy_process_group()
    if ctrl_c.pressed:
        sys.exit(130)
    return history


def main(argv):
    cfg = parse_flags(TrainConfig, argv, __doc__)
    sisa_only = [f'--{name}' for name in ('d_state', 'lambda_fixed', 'sisa_offset', 'kernel') if name in cfg.given]
    if cfg.attention == 'softmax' and sisa_only:
        print(f"note: {', '.join(sisa_only)} set SISA's attention; --attention=softmax has none and ignores them")
    try:
        train(cfg)
    except (prepare_data.DataError, ValueError) as e:  # ValueError: bad model settings (sisa.GPTConfig)
        sys.exit(f'error: {e}')
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError, every device's, from torch 2.5 on
        sys.exit('error: out of GPU memory. Reduce --batch_size (and raise --gradient_accumulation_steps '
                 'to keep the tokens per step), --block_size, or the model (--n_layer, --n_embd). '
                 'The last checkpoint is untouched.')
    except KeyboardInterrupt:  # before the training loop's own handler is in place: nothing to save yet
        sys.exit('interrupted before training began; nothing was saved')


if __name__ == '__main__':
    main(sys.argv[1:])
