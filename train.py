"""
Train a small SISA model (or, with --attention=softmax, the parameter-matched Transformer).

$ python train.py                                   # needle-in-a-haystack, offline, minutes on a laptop CPU
$ python train.py --attention=softmax --out_dir=out-softmax   # the same run with plain attention
$ python train.py --dataset=shakespeare_char --block_size=256 --n_layer=6 --n_embd=384 --n_head=6 --out_dir=out-shakespeare
$ python train.py --init_from=resume --max_iters=8000   # continue out/ckpt.pt
$ python train.py --compare                         # SISA vs Transformer, side by side (README: results)
$ python train.py --benchmark                       # tokens/s of both models, as a ratio
$ torchrun --standalone --nproc_per_node=4 train.py # several GPUs (DDP)

Every setting below is a --name=value flag, and a bare --flag is True for a boolean
(python train.py --help lists them); a config file in nanoGPT's style
(python train.py config.py --flag=...) may set them too.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import prepare_data
from prepare_data import check_values, convert, opt, parse_flags
from sisa import GPT, GPTConfig


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = opt('out', 'checkpoint, log.jsonl and sample go here')
    init_from: str = opt('scratch', "'scratch' or 'resume' (from out_dir/ckpt.pt)")
    eval_interval: int = opt(250, 'evaluate every this many steps')
    eval_iters: int = opt(10, 'batches per loss estimate')
    eval_needles: int = opt(200, 'held-out needle prompts per evaluation')
    always_save_checkpoint: bool = opt(True, 'save at every evaluation, not only when val loss improves')
    # data
    dataset: str = opt('needle', "folder under data/: 'needle' (prepared if missing), 'shakespeare_char', ...")
    batch_size: int = opt(32, 'sequences per micro-step')
    gradient_accumulation_steps: int = opt(1, 'micro-steps per optimizer step')
    block_size: int = opt(64, 'context length (the needle documents are up to 64 characters)')
    # model
    n_layer: int = opt(2, 'layers')
    n_head: int = opt(8, 'heads (more heads found the retrieval sooner in tiny runs)')
    n_embd: int = opt(64, 'model width')
    d_state: int = opt(4, 'SSM channel width per head (even; 4 at this tiny width: 16 would cost 62% of the FFN)')
    attention: str = opt('sisa', "'sisa' or 'softmax' (the parameter-matched Transformer)")
    d_ff: int = opt(0, "the Transformer's SwiGLU width (0: 8 n_embd / 3); SISA's shrinks to match its size")
    kernel: str = opt('auto', "SISA attention: 'auto' (fused Triton kernel on CUDA), 'triton' or 'sdpa'")
    dropout: float = opt(0.0, 'dropout')
    bias: bool = opt(False, 'bias in Linear layers')
    lambda_fixed: bool = opt(False, 'SISA: freeze lambda at its init, 0.31 (ablation: fixed vs learned)')
    sisa_offset: str = opt('exact', "SISA: 'exact', or 'paper': the paper's clamped offset (ablation; not causal)")
    # optimizer: AdamW, linear warmup then cosine decay
    learning_rate: float = opt(3e-3, 'peak learning rate')
    max_iters: int = opt(5000, 'optimizer steps')
    weight_decay: float = opt(0.0, 'on 2-D weights only (0 here: in tiny needle runs decay delayed retrieval)')
    beta1: float = opt(0.9, 'AdamW beta1')
    beta2: float = opt(0.95, 'AdamW beta2')
    grad_clip: float = opt(1.0, 'clip the gradient norm at this value (0: off)')
    warmup_iters: int = opt(100, 'linear warmup steps')
    min_lr: float = opt(3e-4, 'learning rate at the end of the cosine')
    # system
    device: str = opt('auto', "'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'")
    dtype: str = opt('auto', "'auto' (bf16 on CUDA, fp16 where bf16 is unsupported, else fp32), 'float32', 'bfloat16', 'float16'")
    compile: str = opt('auto', "torch.compile: 'auto' (on CUDA), True or False")
    seed: int = opt(1337, 'one seed for init and data order, so runs differ only in what you change')
    sample_tokens: int = opt(120, 'tokens to sample at the end (0: none)')
    # modes
    compare: bool = opt(False, 'train SISA and softmax over several seeds and print a table')
    compare_models: str = opt('sisa,softmax', "--compare: models from 'sisa', 'softmax', 'paper' (SISA, paper's offset)")
    seeds: int = opt(3, 'seeds for --compare')
    compare_jobs: int = opt(1, '--compare: runs trained at once, each in its own process (small models leave a GPU idle)')
    benchmark: bool = opt(False, 'time training steps of SISA and softmax and print tokens/s')
    benchmark_iters: int = opt(20, 'timed steps per model for --benchmark (in 5 windows; the median counts)')
    benchmark_half_life: float = opt(0.0, "--benchmark: every SISA head's decay half-life in tokens (0: init, ~100)")
    vocab_size: int = opt(0, "vocabulary of --benchmark's random tokens (0: the dataset's)")
    overwrite: bool = opt(False, "start afresh in an out_dir that holds another run's checkpoint, replacing it")

    def __post_init__(self):
        self.dtype = DTYPES.get(self.dtype, self.dtype)
        check_values(self, positive=('batch_size', 'gradient_accumulation_steps', 'block_size', 'n_layer', 'n_head',
                                     'n_embd', 'd_state', 'eval_interval', 'eval_iters', 'seeds', 'compare_jobs',
                                     'benchmark_iters'),
                     non_negative=('max_iters', 'eval_needles', 'sample_tokens', 'learning_rate', 'min_lr',
                                   'weight_decay', 'warmup_iters', 'grad_clip', 'd_ff', 'vocab_size',
                                   'benchmark_half_life'),
                     choices=dict(init_from=('scratch', 'resume'), attention=('sisa', 'softmax'),
                                  kernel=('auto', 'triton', 'sdpa'), sisa_offset=('exact', 'paper'),
                                  dtype=('auto', 'float32', 'bfloat16', 'float16'),
                                  compile=('auto', 'True', 'False', 'true', 'false', '1', '0')))
        if not 0 <= self.dropout < 1:
            raise ValueError(f'--dropout must be in [0, 1), got {self.dropout}')


# the dtype names people type, and what they mean
DTYPES = {'fp32': 'float32', 'float': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16', 'half': 'float16'}


# -----------------------------------------------------------------------------
# data: nanoGPT's uint16 memmaps; the needle set also has document starts and eval prompts

class Data:
    def __init__(self, cfg, rank=0):
        self.dir = os.path.join('data', cfg.dataset)
        if cfg.dataset == 'needle' and not os.path.exists(os.path.join(self.dir, 'meta.pkl')):
            if rank == 0:
                print('preparing the default needle dataset (python prepare_data.py)')
                prepare_data.prepare_needle()
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
        if not os.path.exists(os.path.join(self.dir, 'train.bin')):
            offline = (f' (offline, from a local copy: python prepare_data.py --input=path/to/input.txt '
                       f'--name={cfg.dataset})' if cfg.dataset.startswith('shakespeare') else '')
            raise prepare_data.DataError(f'no dataset in {self.dir}; prepare it first with: '
                                         f'python prepare_data.py --dataset={cfg.dataset}{offline}')
        self.meta = prepare_data.load_meta(self.dir)
        self.encode, self.decode = prepare_data.get_tokenizer(self.meta)
        self.block_size, self.batch_size, self.seed = cfg.block_size, cfg.batch_size, cfg.seed
        self.starts = {}
        for split in ('train', 'val'):
            n = len(self.memmap(split))
            if n < cfg.block_size + 1:
                raise prepare_data.DataError(f'{split}.bin holds {n} tokens: too few for block_size='
                                             f'{cfg.block_size}; use a smaller --block_size')
            path = os.path.join(self.dir, f'{split}_starts.bin')
            if os.path.exists(path):  # needle: windows begin at a document's start
                starts = np.fromfile(path, dtype=np.uint32).astype(np.int64)
                self.starts[split] = starts[starts + cfg.block_size + 1 <= n]
        path = os.path.join(self.dir, 'eval.json')
        self.needles = json.load(open(path)) if os.path.exists(path) else None
        if self.needles and self.meta['doc_len'] > cfg.block_size:
            raise prepare_data.DataError(
                f"documents of {cfg.dataset} are up to {self.meta['doc_len']} tokens but block_size is "
                f"{cfg.block_size}: use --block_size={self.meta['doc_len']} or prepare shorter documents "
                f"(python prepare_data.py --doc_len={cfg.block_size} --name=...)")

    def memmap(self, split):
        # a fresh memmap per batch: holding one open grows memory over a long run
        return np.memmap(os.path.join(self.dir, f'{split}.bin'), dtype=np.uint16, mode='r')

    def batch(self, split, step, device, rank=0, stream=0):
        """Batch `step` of `split`: the same for every run with this seed, whatever the model, and
        again after a resume, because it is drawn from a generator seeded by (seed, stream, step, rank).
        train.py gives every process rank 0 and splits the one stream by step (see train).
        Evaluation draws from stream 1, so it never sees the training batches' windows by design."""
        rng = np.random.default_rng([self.seed, stream, step, rank, split == 'val'])
        data = self.memmap(split)
        if split in self.starts:
            ix = self.starts[split][rng.integers(len(self.starts[split]), size=self.batch_size)]
        else:
            ix = rng.integers(len(data) - self.block_size - 1, size=self.batch_size)
        x = torch.stack([torch.from_numpy(data[i:i + self.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + self.block_size].astype(np.int64)) for i in ix])
        if device.type == 'cuda':
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def needle_accuracy(model, data, prompts, device, ctx, batch_size=100):
    """Fraction of prompts whose greedy answer is exactly the secret number.

    Greedy decoding gets every digit right iff, fed the true answer, the argmax is right at
    every digit, so one batched forward of prompt + answer decides it. Prompts are batched
    by length, never padded: padding would be harmless to a causal model, but not to the
    paper's clamped offset, where the last token reaches earlier ones.
    """
    by_length = {}
    for p in prompts:
        by_length.setdefault(len(data.encode(p['prompt'] + p['answer'])), []).append(p)
    correct = 0
    for L, group in by_length.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            x = torch.tensor([data.encode(p['prompt'] + p['answer']) for p in chunk], device=device)
            with ctx:
                logits, _ = model(x, x)  # targets given: logits at every position
            n = len(data.encode(chunk[0]['answer']))
            correct += (logits[:, L - n - 1:L - 1].argmax(-1) == x[:, L - n:]).all(-1).sum().item()
    return correct / len(prompts)


@torch.no_grad()
def evaluate(model, data, cfg, device, ctx):
    """Train and val loss, needle accuracy, and SISA's diagnostics per layer."""
    model.eval()
    attns = [block.attn for block in model.transformer.h]
    out = {}
    for split in ('train', 'val'):
        losses, chunked = [], []
        for k in range(cfg.eval_iters):
            for a in attns:
                a.record_stats = split == 'val'
            x, y = data.batch(split, k, device, stream=1)  # the same eval batches every time
            with ctx:
                _, loss = model(x, y)
            losses.append(loss.item())
            if split == 'val' and attns[0].sisa:
                chunked.append([a.stats['chunked'] for a in attns])
        out[f'{split}_loss'] = float(np.mean(losses))
    for a in attns:
        a.record_stats = False
    if data.needles and cfg.eval_needles:  # --eval_needles=0: no needle evaluation
        out['needle_acc'] = needle_accuracy(model, data, data.needles[:cfg.eval_needles], device, ctx)
    if attns[0].sisa:  # lambda per head, mean decay half-life, how often the exact path chunked
        out['layers'] = [dict(lam=[round(v, 4) for v in a.stats['lam']],
                              half_life=round(float(np.mean(a.stats['half_life'])), 1),
                              span=round(a.stats['span'], 1),
                              chunked=float(np.mean([c[i] for c in chunked])))
                         for i, a in enumerate(attns)]
    model.train()
    return out


# -----------------------------------------------------------------------------
# system set-up

def pick_device(cfg):
    if cfg.device != 'auto':
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise ValueError(f"--device={cfg.device} is not a device: use auto, cpu, cuda, cuda:N or mps")
        mps = getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()
        if (device.type == 'cuda' and not torch.cuda.is_available()) or (device.type == 'mps' and not mps) or \
                device.type not in ('cpu', 'cuda', 'mps'):
            raise ValueError(f'--device={cfg.device}: there is no such device here; use --device=auto or --device=cpu')
        if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f'--device={cfg.device}: this machine has {torch.cuda.device_count()} CUDA devices')
        return device
    if torch.cuda.is_available():
        return torch.device('cuda')
    if getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


def pick_dtype(cfg, device):
    if cfg.dtype != 'auto':
        return cfg.dtype
    if device.type == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return 'float32'  # MPS and CPU: fp32


def peak_flops(device, dtype):
    """Dense peak FLOP/s for MFU, where we know it (bf16/fp16 tensor cores)."""
    if device.type != 'cuda' or dtype == 'float32':
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in [('H100', 989e12), ('H200', 989e12), ('A100', 312e12), ('L4', 121e12), ('4090', 165e12)]:
        if key in name:
            return flops
    return None


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
                     kernel=cfg.kernel, sisa_offset=cfg.sisa_offset)


def use_compile(cfg, device):
    return device.type == 'cuda' if cfg.compile == 'auto' else convert('compile', cfg.compile, bool)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise prepare_data.DataError(f'no checkpoint at {path}; train one first with python train.py')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise prepare_data.DataError(f'{path} is not a checkpoint that train.py wrote, or it was cut short '
                                     f'({type(e).__name__})')


def clean_state_dict(state):
    # a compiled model's keys carry an '_orig_mod.' prefix; strip it so any model loads them
    return {k.removeprefix('_orig_mod.'): v for k, v in state.items()}


def compiled_or_eager(model, batch, ctx):
    """torch.compile(model), tried on one forward and backward, since compilation happens at the
    first call; where it fails (Windows, some Pythons, MPS) training goes on uncompiled."""
    try:
        compiled = torch.compile(model)
        with ctx:
            _, loss = compiled(*batch)
        loss.backward()
        return compiled
    except Exception as e:
        print(f'warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:100]}); training uncompiled')
        return model
    finally:
        model.zero_grad(set_to_none=True)


def save_checkpoint(path, ckpt):
    tmp = path + '.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the old checkpoint or the new one, never half of one


# -----------------------------------------------------------------------------
# training

# settings a resumed run cannot change: its weights and optimizer state were made with them
RUN_FIXED = {'dataset', 'n_layer', 'n_head', 'n_embd', 'd_state', 'attention', 'd_ff', 'bias', 'block_size',
             'sisa_offset', 'lambda_fixed'}


def train(cfg, quiet=False):
    """Train as cfg says; returns the list of evaluations (also appended to out_dir/log.jsonl)."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:  # one process per device, started by torchrun: nccl between GPUs, gloo between CPU processes
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        device = pick_device(cfg)
        if device.type == 'cuda':
            device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
            torch.cuda.set_device(device)
        if cfg.gradient_accumulation_steps % world:
            raise ValueError(f'--gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of '
                             f'the {world} processes: each runs gradient_accumulation_steps / {world} micro-steps')
        init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    else:
        rank, world, device = 0, 1, pick_device(cfg)
    # The run is the same run on any number of processes: step s has micro-batches
    # s * G ... s * G + G - 1 (G = gradient_accumulation_steps), and rank r takes the r-th
    # run of G / world of them. DDP averages the ranks' gradients, each the mean of its micro-steps.
    micro_steps = cfg.gradient_accumulation_steps // world
    master = rank == 0
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dtype = pick_dtype(cfg, device)
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    ctx = contextlib.nullcontext() if dtype == 'float32' else torch.autocast(device.type, dtype=ptdtype)
    ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if cfg.init_from == 'scratch' and os.path.exists(ckpt_path) and not cfg.overwrite:
        raise ValueError(f'{ckpt_path} holds a run already: continue it with --init_from=resume, start this one '
                         f'elsewhere with --out_dir=..., or replace it with --overwrite')
    ckpt = load_checkpoint(ckpt_path) if cfg.init_from == 'resume' else None
    if ckpt:  # continue the same run: its dataset, model and settings, but for the flags given now
        given = getattr(cfg, 'given', frozenset())
        for name in sorted(given & RUN_FIXED):
            was = ckpt['config'].get(name, ckpt['model_args'].get(name))
            if getattr(cfg, name) != was:
                raise ValueError(f'--{name}={getattr(cfg, name)} differs from the run in {ckpt_path} ({name}={was}): '
                                 f'a resumed run keeps its model and data; start a new one with another --out_dir')
        keep = {f.name for f in dataclasses.fields(cfg)} - given - {'init_from', 'out_dir', 'compare', 'benchmark'}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in ckpt['config'].items() if k in keep})
        if ckpt['iter_num'] >= cfg.max_iters:
            print(f"nothing to do: {ckpt_path} is at step {ckpt['iter_num']} and --max_iters is {cfg.max_iters}; "
                  f"give a larger --max_iters to go on")
            return []
    try:  # fail now, not after an evaluation interval of training
        os.makedirs(cfg.out_dir, exist_ok=True)
        probe = os.path.join(cfg.out_dir, f'.write_test_{rank}')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f'--out_dir={cfg.out_dir} cannot be written: {e.strerror}')
    data = Data(cfg, rank)

    # model and optimizer, fresh or from the checkpoint
    iter_num, best_val_loss = 0, float('inf')
    if ckpt:
        gptconf = GPTConfig(**{**ckpt['model_args'], 'kernel': cfg.kernel})  # the kernel is where it runs
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    elif cfg.init_from == 'scratch':
        gptconf = model_config(cfg, data.meta['vocab_size'])
    else:
        sys.exit(f"error: --init_from must be 'scratch' or 'resume', got {cfg.init_from!r}")
    model = GPT(gptconf)
    if ckpt:
        model.load_state_dict(clean_state_dict(ckpt['model']))
    model.to(device)
    if cfg.lambda_fixed:
        for block in model.transformer.h:
            if block.attn.sisa:
                block.attn.lambda_raw.requires_grad_(False)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    if ckpt:
        optimizer.load_state_dict(ckpt['optimizer'])
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == 'float16')  # fp16 needs loss scaling; bf16 does not
    raw_model = model
    if use_compile(cfg, device):
        model = compiled_or_eager(model, data.batch('train', 0, device), ctx)
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    flops_peak = peak_flops(device, dtype)
    if master and not quiet:
        print(f'{gptconf.attention}: {raw_model.get_num_params():,} parameters, {device} {dtype}, '
              f'{tokens_per_iter:,} tokens per step, {"compiled" if model is not raw_model else "eager"}')

    def checkpoint():
        save_checkpoint(ckpt_path, dict(model=clean_state_dict(raw_model.state_dict()),
                                        optimizer=optimizer.state_dict(), model_args=dataclasses.asdict(gptconf),
                                        iter_num=iter_num, best_val_loss=best_val_loss,
                                        config=dataclasses.asdict(cfg), meta=data.meta))

    # Ctrl-C: finish the step in flight, save, exit (never mid-update, never a half-written file).
    # Under torchrun every process gets the signal, or one does: they agree each step (all_reduce).
    stop = []
    old_handler = signal.signal(signal.SIGINT, lambda *_: stop.append(1))

    def stopping():
        if not ddp:
            return bool(stop)
        flag = torch.tensor([float(bool(stop))], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() > 0

    history, log_path = [], os.path.join(cfg.out_dir, 'log.jsonl')
    if cfg.init_from == 'scratch' and master and os.path.exists(log_path):
        os.remove(log_path)
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=not master or quiet, dynamic_ncols=True)
    t0, tokens_seen = time.time(), 0
    while True:
        last = iter_num >= cfg.max_iters
        if master and (iter_num % cfg.eval_interval == 0 or last) and not (ckpt and iter_num == ckpt['iter_num'] and not last):
            ev = evaluate(raw_model, data, cfg, device, ctx)
            ev = dict(iter=iter_num, lr=lr_at(iter_num, cfg), **ev, time=round(time.time() - t0, 1))
            history.append(ev)
            with open(log_path, 'a') as f:
                f.write(json.dumps(ev) + '\n')
            if not quiet:
                msg = f"step {iter_num}: train {ev['train_loss']:.4f}, val {ev['val_loss']:.4f}"
                if 'needle_acc' in ev:
                    msg += f", needle {ev['needle_acc']:.0%}"
                if 'layers' in ev:
                    msg += ', lambda ' + '/'.join(f"{np.mean(l['lam']):.2f}" for l in ev['layers'])
                    msg += ', half-life ' + '/'.join(f"{l['half_life']:.0f}" for l in ev['layers'])
                    msg += f", chunked {np.mean([l['chunked'] for l in ev['layers']]):.0%}"
                bar.write(msg)
            if ev['val_loss'] < best_val_loss or cfg.always_save_checkpoint:
                best_val_loss = min(best_val_loss, ev['val_loss'])
                if iter_num > 0:
                    checkpoint()
        if last:
            break
        if stopping():
            stop.append(1)
            break

        # one optimizer step: forward/backward over the micro-steps, clip, step
        lr = lr_at(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        for micro in range(micro_steps):
            if ddp:  # sync gradients on the last micro-step only
                model.require_backward_grad_sync = micro == micro_steps - 1
            x, y = data.batch('train', iter_num * cfg.gradient_accumulation_steps + rank * micro_steps + micro, device)
            with ctx:
                _, loss = model(x, y)
                loss = loss / micro_steps
            scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        tokens_seen += tokens_per_iter
        if master and (iter_num % 10 == 0 or iter_num == 1):
            rate = tokens_seen / (time.time() - t0)
            mfu = raw_model.estimate_mfu(rate / world, flops_peak)
            bar.set_postfix(loss=f'{loss.item() * micro_steps:.4f}', tok_s=f'{rate:,.0f}',
                            mfu='n/a' if mfu is None else f'{mfu:.1%}')
        bar.update(1)
    bar.close()
    if stop and master:
        checkpoint()
        print(f'interrupted: saved step {iter_num} to {ckpt_path}; continue with --init_from=resume')
    elif master and cfg.max_iters > 0:
        checkpoint()
    signal.signal(signal.SIGINT, old_handler)
    if master and cfg.sample_tokens and not quiet and not stop:
        print_sample(raw_model, data, device, ctx, cfg.sample_tokens)
    if ddp:  # leave together: rank 0 may still be saving, and a rank that tears down early can abort a peer
        torch.distributed.barrier()
        destroy_process_group()
    if stop:
        sys.exit(130)
    return history


def print_sample(model, data, device, ctx, n):
    model.eval()
    start = data.needles[0]['prompt'] if data.needles else '\n'
    idx = torch.tensor([data.encode(start)], device=device)[:, -model.config.block_size:]
    torch.manual_seed(0)
    with ctx:  # the needle's answer greedily; text sampled (greedy text from a small model repeats one character)
        out = model.generate(idx, len(data.needles[0]['answer']) if data.needles else n,
                             temperature=0 if data.needles else 0.8, top_k=None if data.needles else 20)
    print('sample:\n' + data.decode(out[0].tolist()))
    if data.needles:
        print(f"(the secret number was {data.needles[0]['answer']})")


# -----------------------------------------------------------------------------
# --compare: SISA against the parameter-matched Transformer, same seeds, data and schedule

def steps_to(history, level):
    return next((h['iter'] for h in history if h.get('needle_acc', 0) >= level), None)


def spread(values, fmt='{:.0f}'):
    """'median [min, max]' over seeds; '-' marks a seed that never got there."""
    if any(v is None for v in values):
        got = sorted(v for v in values if v is not None)
        return f"never ({len(got)}/{len(values)} seeds)" if not got else \
            f"{len(got)}/{len(values)} seeds: {', '.join(fmt.format(v) for v in got)}"
    if len(values) == 1:
        return fmt.format(values[0])
    return f'{fmt.format(float(np.median(values)))} [{fmt.format(min(values))}, {fmt.format(max(values))}]'


@torch.no_grad()
def length_sweep(out_dir, data, cfg, lengths):
    """Needle accuracy of a trained checkpoint at several document lengths (beyond training too)."""
    device = pick_device(cfg)
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    model = GPT(GPTConfig(**{**ckpt['model_args'], 'kernel': cfg.kernel}))
    model.load_state_dict(clean_state_dict(ckpt['model']))
    model.config.block_size = max(lengths)  # RoPE has no table: let it see longer inputs than it trained on
    model.to(device).eval()
    ctx = contextlib.nullcontext() if pick_dtype(cfg, device) == 'float32' else torch.autocast(device.type, dtype=torch.bfloat16)
    n_digits = data.meta['n_digits']
    return {L: needle_accuracy(model, data, prepare_data.needle_eval_set(cfg.eval_needles, cfg.seed + 2, L, n_digits),
                               device, ctx) for L in lengths}


@torch.no_grad()
def leak(out_dir, data, cfg):
    """How far the last token reaches back: the largest change of any earlier position's
    log-probabilities when only the last token of a validation window is replaced (the median
    over a batch of windows), and the fraction of earlier positions whose greedy prediction flips.
    0 for a causal model; the paper's clamped offset is not causal."""
    device = pick_device(cfg)
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    model = GPT(GPTConfig(**{**ckpt['model_args'], 'kernel': cfg.kernel}))
    model.load_state_dict(clean_state_dict(ckpt['model']))
    model.to(device).eval()
    ctx = contextlib.nullcontext() if pick_dtype(cfg, device) == 'float32' else torch.autocast(device.type, dtype=torch.bfloat16)
    x, _ = data.batch('val', 0, device, stream=2)
    other = x.clone()
    other[:, -1] = (x[:, -1] + 1) % data.meta['vocab_size']
    with ctx:
        a, b = (model(t, t)[0][:, :-1].float().log_softmax(-1) for t in (x, other))
    return dict(max_change=(a - b).abs().amax((1, 2)).median().item(),
                flips=(a.argmax(-1) != b.argmax(-1)).float().mean().item())


def compare_run(run, lengths):
    """One model and seed of --compare: train it, then its length sweep and its leak."""
    history = train(run, quiet=True)
    data = Data(run)
    sweep = length_sweep(run.out_dir, data, run, lengths) if lengths else {}
    return dict(history=history, sweep=sweep, leak=leak(run.out_dir, data, run))


def compare(cfg):
    data = Data(cfg)
    needle = data.needles is not None and cfg.eval_needles > 0
    lengths = [L for L in (cfg.block_size * f // 4 for f in (1, 2, 3, 4, 5, 6))
               if L >= prepare_data.needle_min_len(data.meta.get('n_digits', 2))] if needle else []
    names = cfg.compare_models.split(',')
    if not names or any(m not in ('sisa', 'softmax', 'paper') for m in names):
        sys.exit(f"error: --compare_models takes 'sisa', 'softmax' and 'paper', comma-separated; got {cfg.compare_models!r}")
    jobs = [(m, s, dataclasses.replace(cfg, attention='softmax' if m == 'softmax' else 'sisa',
                                       sisa_offset='paper' if m == 'paper' else 'exact', seed=cfg.seed + s,
                                       compare=False, sample_tokens=0, init_from='scratch',
                                       out_dir=os.path.join(cfg.out_dir, f'{m}_seed{s}')))
            for s in range(cfg.seeds) for m in names]
    results = {}
    bar = tqdm(total=len(jobs), desc='compare')

    def done(m, s, r):
        results[m, s] = r
        bar.update(1)
        first = steps_to(r['history'], 1.0)
        bar.write(f"{m} seed {cfg.seed + s}: val loss {r['history'][-1]['val_loss']:.4f}"
                  + (f", needle {r['history'][-1]['needle_acc']:.0%}, "
                     + ('never 100%' if first is None else f'first 100% at step {first}') if needle else ''))

    if cfg.compare_jobs == 1:
        for m, s, run in jobs:
            done(m, s, compare_run(run, lengths))
    else:  # each run in a fresh process; the results are the same as one after another (a test checks)
        with torch.multiprocessing.get_context('spawn').Pool(min(cfg.compare_jobs, len(jobs))) as pool:
            pending = [(m, s, pool.apply_async(compare_run, (run, lengths))) for m, s, run in jobs]
            for m, s, r in pending:
                done(m, s, r.get())
    bar.close()
    runs = {m: [results[m, s] for s in range(cfg.seeds)] for m in names}
    with open(os.path.join(cfg.out_dir, 'compare.json'), 'w') as f:
        json.dump(dict(config=dataclasses.asdict(cfg), runs=runs), f)

    steps = [h['iter'] for h in runs[names[0]][0]['history']]
    marks = sorted({steps[len(steps) // 4], steps[len(steps) // 2], steps[-1]})
    rows = []
    if needle:
        rows += [(f'steps to {int(level * 100)}% needle', [spread([steps_to(r['history'], level) for r in runs[a]])
                                                          for a in runs]) for level in (0.5, 0.9, 1.0)]
        rows.append(('final needle accuracy', [spread([r['history'][-1]['needle_acc'] * 100 for r in runs[a]], '{:.1f}%')
                                               for a in runs]))
    for m in marks:
        rows.append((f'val loss at step {m}', [spread([next(h['val_loss'] for h in r['history'] if h['iter'] == m)
                                                        for r in runs[a]], '{:.4f}') for a in runs]))
    for L in lengths:
        rows.append((f'needle at length {L}' + (' (> block)' if L > cfg.block_size else ''),
                     [spread([r['sweep'][L] * 100 for r in runs[a]], '{:.1f}%') for a in runs]))
    rows.append(('leak: max change of log p', [spread([r['leak']['max_change'] for r in runs[a]], '{:.2g}') for a in runs]))
    rows.append(('leak: predictions flipped', [spread([r['leak']['flips'] * 100 for r in runs[a]], '{:.2f}%') for a in runs]))
    print(f"\n{cfg.dataset}, {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.max_iters} steps, {cfg.seeds} seeds "
          f"(median [min, max])\n")
    title = {'sisa': 'SISA', 'softmax': 'Transformer', 'paper': "SISA, paper's offset"}
    print(f"| {'':<30} | " + ' | '.join(f'{title[a]:<28}' for a in runs) + ' |')
    print(f"|{'-' * 32}|" + '|'.join('-' * 30 for _ in runs) + '|')
    for name, values in rows:
        print(f'| {name:<30} | ' + ' | '.join(f'{v:<28}' for v in values) + ' |')


# -----------------------------------------------------------------------------
# --benchmark: training throughput of both models, side by side in one run

def benchmark(cfg):
    """Each model is timed in a fresh process, so neither inherits the other's compilation
    caches or allocator state: the figure is the one the model gets when timed alone."""
    device = pick_device(cfg)
    vocab = cfg.vocab_size or Data(cfg).meta['vocab_size']
    half_life = f'half-life {cfg.benchmark_half_life:g} tokens' if cfg.benchmark_half_life else 'decays at init'
    if int(os.environ.get('RANK', 0)) == 0:
        print(f'{device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}), torch {torch.__version__}, '
              f'{pick_dtype(cfg, device)}, {"compiled" if use_compile(cfg, device) else "eager"}, batch {cfg.batch_size} x '
              f'{cfg.block_size}, vocab {vocab}, SISA kernel {cfg.kernel}, {half_life}')
    if 'RANK' in os.environ:  # torchrun: the one model of --attention, data-parallel, timed in these processes
        r = time_steps(cfg, vocab)
        if r['rank'] == 0:
            print(f"{cfg.attention}: {r['world']} processes x batch {cfg.batch_size}: {r['tok_s']:,.0f} tok/s in all, "
                  f"{r['step_ms']:.1f} ms/step (windows {r['windows']} ms), MFU per GPU "
                  + ('n/a' if r['mfu'] is None else f"{r['mfu']:.1%}"))
        return {cfg.attention: r}
    results = {}
    for attention in ('sisa', 'softmax'):
        with torch.multiprocessing.get_context('spawn').Pool(1) as pool:
            r = results[attention] = pool.apply(time_steps, (dataclasses.replace(cfg, attention=attention), vocab))
        mem = 'n/a' if r['mem_gib'] is None else f"{r['mem_gib']:.2f} GiB"
        mfu = 'n/a' if r['mfu'] is None else f"{r['mfu']:.1%}"
        print(f"{attention:>8}: {r['params'] / 1e6:.2f}M params, {r['tok_s']:,.0f} tok/s, {r['step_ms']:.1f} ms/step "
              f"(windows {r['windows']} ms), peak {mem}, MFU {mfu}")
    s, t = results['sisa'], results['softmax']
    memory = f"{s['mem_gib'] / t['mem_gib']:.3f}x" if s['mem_gib'] else 'n/a'
    print(f"SISA/Transformer: throughput {s['tok_s'] / t['tok_s']:.3f}x, memory {memory} "
          f"(MFU counts 6N + 6 n_layer n_head block_size (2 d_h + d_s) FLOPs per token; d_s = 0 for softmax)")
    return results


def time_steps(cfg, vocab):
    """Median time of full training steps (forward, backward, clipping, AdamW) of one model,
    over 5 windows after 5 warm-up steps (compilation included). The learning rate is 0, so
    the decays stay where they were set. Under torchrun every process takes its own batch
    and DDP averages the gradients, as in training; tok_s counts the tokens of all of them."""
    device = pick_device(cfg)
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if 'RANK' in os.environ:
        if device.type == 'cuda':
            device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
            torch.cuda.set_device(device)
        init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    dtype = pick_dtype(cfg, device)
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    ctx = contextlib.nullcontext() if dtype == 'float32' else torch.autocast(device.type, dtype=ptdtype)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, vocab)).to(device)
    if cfg.benchmark_half_life and cfg.attention == 'sisa':
        for block in model.transformer.h:  # w_a = 0 at init: every token decays by softplus(b_a)
            block.attn.a_bias.data.fill_(math.log(math.expm1(math.log(2) / cfg.benchmark_half_life)))
    optimizer = model.configure_optimizers(cfg.weight_decay, 0.0, (cfg.beta1, cfg.beta2), device.type)
    run = torch.compile(model) if use_compile(cfg, device) else model
    if world > 1:
        run = DDP(run, device_ids=[device.index] if device.type == 'cuda' else None)
    x = torch.randint(vocab, (cfg.batch_size, cfg.block_size), device=device,
                      generator=torch.Generator(device).manual_seed(cfg.seed + rank))

    def step():
        with ctx:
            _, loss = run(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    sync()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    windows = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(max(1, cfg.benchmark_iters // 5)):
            step()
        sync()
        windows.append((time.perf_counter() - t0) / max(1, cfg.benchmark_iters // 5))
    dt = float(np.median(windows))
    tok_s = world * cfg.batch_size * cfg.block_size / dt
    if 'RANK' in os.environ:
        torch.distributed.barrier()
        destroy_process_group()
    return dict(params=model.get_num_params(), tok_s=tok_s, step_ms=dt * 1000, rank=rank, world=world,
                windows='/'.join(f'{w * 1000:.1f}' for w in windows),
                mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None,
                mfu=model.estimate_mfu(tok_s / world, peak_flops(device, dtype)))


def main(argv):
    cfg = parse_flags(TrainConfig, argv, __doc__)
    try:
        if cfg.benchmark:
            benchmark(cfg)
        elif cfg.compare:
            compare(cfg)
        else:
            train(cfg)
    except prepare_data.DataError as e:
        sys.exit(f'error: {e}')
    except ValueError as e:  # bad model settings (sisa.GPTConfig)
        sys.exit(f'error: {e}')
    except torch.OutOfMemoryError:
        sys.exit('error: out of GPU memory. Reduce --batch_size (and raise --gradient_accumulation_steps '
                 'to keep the tokens per step), --block_size, or the model (--n_layer, --n_embd). '
                 'The last checkpoint is untouched.')


if __name__ == '__main__':
    main(sys.argv[1:])
