"""
Batches from a prepared dataset (python prepare_data.py writes it), the needle task's score, and the
sample train.py prints at the end.

Datasets are nanoGPT's layout: data/<name>/train.bin and val.bin, uint16 token ids, read
through memmaps, and meta.pkl. The needle set also has each document's start and eval.json,
held-out prompts with their answers.
"""
import json
import os

import numpy as np
import torch

import prepare_data


class Data:
    """One prepared dataset: its splits, its tokenizer, and the needle's held-out prompts if it has them."""

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


def print_sample(model, data, device, ctx, n):
    """What train.py shows at the end: the first held-out needle answered greedily, or n tokens of text."""
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
