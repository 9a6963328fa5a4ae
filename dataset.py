"""
Batches from a prepared dataset (python prepare_data.py writes it), the needle task's score, the
paper's copy probe, the associative-recall tasks (made on the fly), and what train.py logs at
each evaluation and prints at the end.

Datasets are nanoGPT's layout: data/<name>/train.bin and val.bin, uint16 token ids, read
through memmaps, and meta.pkl. The needle set also has each document's start and eval.json,
held-out prompts with their answers. --dataset=recall and recall_forget need no files.
"""
import json
import math
import os
import random
import string
import sys

import numpy as np
import torch

import prepare_data
from sisa import fused_kernel


def load_data(cfg, rank=0):
    """The dataset cfg names: an associative-recall task, or a prepared one under data/."""
    return Recall(cfg) if cfg.dataset in ('recall', 'recall_forget') else Data(cfg, rank)


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
            gpt2 = ' --tokenizer=gpt2' if cfg.dataset == 'shakespeare' else ''
            offline = (f' (offline, from a local copy: python prepare_data.py --input=path/to/input.txt{gpt2} '
                       f'--name={cfg.dataset})' if cfg.dataset.startswith('shakespeare') else '')
            raise prepare_data.DataError(f'no dataset in {self.dir}; prepare it first with: '
                                         f'python prepare_data.py --dataset={cfg.dataset}{offline}')
        self.meta = prepare_data.load_meta(self.dir)
        self.encode, self.decode = prepare_data.get_tokenizer(self.meta)
        self.block_size, self.batch_size, self.seed = cfg.block_size, cfg.batch_size, cfg.seed
        self.starts, self.probes = {}, None
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
        if self.meta.get('probe') and cfg.eval_needles:  # the copying corpus: probe prompts at up to 3 lengths
            self.probes = {L: probe_set(cfg.eval_needles, cfg.seed + 2, L) for L in
                           (cfg.block_size // 4, cfg.block_size // 2, cfg.block_size) if L >= PROBE_MIN_LEN}
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
        Evaluation draws from stream 1: its batches are the same at every evaluation and another draw than
        training's (on the train split they overlap training's windows, as any estimate of the train loss does)."""
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
def needle_accuracy(model, data, prompts, device, ctx, batch_size=100, first=False):
    """Fraction of prompts whose greedy answer is exactly the secret number (with first, whose
    greedy answer begins with its first token).

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
            k = 1 if first else n
            correct += (logits[:, L - n - 1:L - n - 1 + k].argmax(-1) == x[:, L - n:L - n + k]).all(-1).sum().item()
    return correct / len(prompts)


# the paper's zero-shot copy probe (its run_bench_original.py, in characters): filler text, one
# sentence "{key} {VALUE}." early in it, and the prompt ends with the key phrase again. A model that
# copies from its context answers with the value, which it never saw in training.
PROBE_FILLER = 'The quick brown fox jumps over the lazy dog. '
PROBE_MIN_LEN = 128  # room for the needle, the key at the end and some filler
PROBE_KEYS = ('The secret code is', 'The password is', 'The answer is', 'The key number is', 'The magic word is')


def probe_set(n, seed, length, value_len=5):
    """n {'prompt', 'answer'} dicts, prompt and answer together `length` characters: the filler,
    "{key} {VALUE}. " at a word start between character 5 and the filler's middle (the paper's
    placement), then "{key} " at the end; the answer, VALUE, is value_len random capitals."""
    rng = random.Random(seed)
    probes = []
    for _ in range(n):
        key, value = rng.choice(PROBE_KEYS), ''.join(rng.choices(string.ascii_uppercase, k=value_len))
        room = length - len(f'{key} {value}. ') - len(f'{key} ') - value_len
        if room < len(PROBE_FILLER):
            raise ValueError(f'a copy probe of {length} characters leaves no room for the filler')
        filler = (PROBE_FILLER * (room // len(PROBE_FILLER) + 1))[:room]
        at = rng.choice([i + 1 for i in range(4, room // 2) if filler[i] == ' '])
        probes.append(dict(prompt=f'{filler[:at]}{key} {value}. {filler[at:]}{key} ', answer=value))
    return probes


def copy_probe(model, data, device, ctx):
    """{length: [share of first letters right, share of whole values right]}, greedy, for the probes."""
    return {str(L): [needle_accuracy(model, data, prompts, device, ctx, first=True),
                     needle_accuracy(model, data, prompts, device, ctx)] for L, prompts in data.probes.items()}


class Loss:
    """model(x, y)'s loss, eager; on CUDA replayed from a CUDA graph, one a shape of batch, captured at
    its first batch. An eager forward launches a few hundred kernels, and at the tiny shapes the host takes
    longer to launch them than the GPU to run them (docs/performance.md); a replay launches them at once.
    The graphs live as long as this object: evaluate makes one an evaluation, so no memory stays held."""

    def __init__(self, model, ctx, graphs):
        self.model, self.ctx, self.graphs = model, ctx, {} if graphs else None
        self.attns = [block.attn for block in model.transformer.h]

    def __call__(self, x, y):
        if self.graphs is None:
            with self.ctx:
                return self.model(x, y)[1]
        if x.shape not in self.graphs:
            self.graphs[x.shape] = self.capture(x.clone(), y.clone())
        static_x, static_y, graph, loss, stats = self.graphs[x.shape]
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        for a, s in zip(self.attns, stats):
            a.stats = s  # what this graph recorded (a later capture left its own there)
        return loss.clone()  # the next replay overwrites loss

    def capture(self, x, y):
        stream = torch.cuda.Stream()  # one forward on the capture's stream first, as torch's CUDA graph notes ask
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self.ctx:
            self.model(x, y)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream), self.ctx:  # autocast inside: its weight casts are captured
            _, loss = self.model(x, y)
        return x, y, graph, loss, [a.stats for a in self.attns]


FP16_WARNING = 2.0 ** 14  # evaluate warns from a quarter of fp16's largest value (65504)


@torch.no_grad()
def evaluate(model, data, cfg, device, ctx, graphs=None):
    """What train.py logs at each evaluation: train and val loss, the task's score (needle, copy probe
    or recall) and SISA's diagnostics per layer. graphs: the losses' forwards from CUDA graphs (Loss); by
    default on CUDA, for the Transformer and SISA's fused kernel."""
    model.eval()
    attns = [block.attn for block in model.transformer.h]
    if graphs is None:  # where training takes them (train.pick_compile_mode): the chunked SDPA form syncs on its chunks
        graphs = device.type == 'cuda' and all(not a.sisa or a.sisa_offset == 'exact' and fused_kernel(a.kernel, device)
                                               for a in attns)
    loss_of = Loss(model, ctx, graphs)
    for a in attns:
        a.record_stats = True  # no sync: read once below
    out, stats = {}, []
    for split in ('train', 'val'):
        losses = []
        for k in range(cfg.eval_iters):
            x, y = data.batch(split, k, device, stream=1)  # the same eval batches every time
            losses.append(loss_of(x, y))
            if split == 'val' and attns[0].sisa:
                stats.append(torch.stack([a.stats for a in attns]))  # (layers, values)
        out[f'{split}_loss'] = torch.stack(losses).float().mean().item()
    for a in attns:
        a.record_stats, a.stats = False, None  # no tensor left in the graphs' memory
    del loss_of  # the graphs and their memory
    if data.needles and cfg.eval_needles:  # --eval_needles=0: no needle evaluation
        out['needle_acc'] = needle_accuracy(model, data, data.needles[:cfg.eval_needles], device, ctx)
    if hasattr(data, 'lengths'):  # associative recall: the share of answers right at each length
        out['recall_acc'] = recall_accuracy(model, data, device, ctx, cfg.eval_iters)
    if data.probes:  # the copying corpus: the paper's copy probe at three lengths
        out['probe'] = copy_probe(model, data, device, ctx)
    if attns[0].sisa:  # lambda per head, mean half-life (the last val batch's), how often the exact path chunked
        batches = [[a.diagnostics(v) for a, v in zip(attns, layers)] for layers in torch.stack(stats).tolist()]
        out['layers'] = [dict(lam=[round(v, 4) for v in last['lam']],
                              half_life=round(float(np.mean(last['half_life'])), 1),
                              span=round(last['span'], 1),
                              chunked=float(np.mean([b[i]['chunked'] for b in batches])),
                              operand=round(max(b[i]['operand'] for b in batches), 1))
                         for i, last in enumerate(batches[-1])]
        operand = max(layer['operand'] for layer in out['layers'])
        fused = attns[0].sisa_offset == 'exact' and fused_kernel(attns[0].kernel, device)
        if fused and attns[0].stats_dtype != torch.float32 and operand > FP16_WARNING:
            out['operand_warning'] = operand  # past fp16's range a score is inf in the fused kernel, the loss NaN
    model.train()
    return out


def percent(x):
    """x as a percent: whole where it is one (1.0 as '100%'), else with the digits it takes not to look whole
    or 0 (one needle of 200 as '0.5%', not '0%'; 1999 of 2000 as '99.95%', not '100%')."""
    if abs(x * 100 - round(x * 100)) < 1e-9:
        return f'{x:.0%}'
    digits = 1
    while digits < 6 and float(f'{x * 100:.{digits}f}') in (0, 100):
        digits += 1
    return f'{x:.{digits}%}'


def report(ev, bar):
    """An evaluation as one line above the progress bar."""
    msg = f"step {ev['iter']}: train {ev['train_loss']:.4f}, val {ev['val_loss']:.4f}"
    if 'needle_acc' in ev:
        msg += f", needle {percent(ev['needle_acc'])}"
    if 'probe' in ev:
        msg += (', probe ' + '/'.join(percent(f) for f, _ in ev['probe'].values()) + ' first, '
                + '/'.join(percent(w) for _, w in ev['probe'].values()) + f" whole at {'/'.join(ev['probe'])}")
    if 'recall_acc' in ev:
        msg += (', recall ' + '/'.join(percent(a) for a in ev['recall_acc'].values())
                + f" at {'/'.join(ev['recall_acc'])}")
    if 'layers' in ev:
        msg += ', lambda ' + '/'.join(f"{np.mean(l['lam']):.2f}" for l in ev['layers'])
        msg += ', half-life ' + '/'.join(f"{l['half_life']:.0f}" for l in ev['layers'])
        msg += f", chunked {np.mean([l['chunked'] for l in ev['layers']]):.0%}"
    if 'operand_warning' in ev:
        msg += (f"; warning: importance operands up to {ev['operand_warning']:,.0f}, near fp16's 65504, the most "
                "the fused kernel's score dots hold (--kernel=sdpa has no such limit)")
    bar.write(msg)
    sys.stdout.flush()  # into a file too, as it happens


def print_sample(model, data, device, ctx, n):
    """What train.py shows at the end: the first held-out needle answered greedily, a recall example
    answered, or n tokens of text."""
    model.eval()
    if isinstance(data, Recall):
        print('sample:')
        return show_recall(model, data.meta, 1, 0, device, ctx)
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
# associative recall: Zoology's multi-query associative recall (MQAR), the field's standard test of
# whether a sequence model can look up what it was told. Pairs of random tokens, key then value,
# then every key asked again among blanks; the loss and the score count the answers only (the
# targets elsewhere are -1, which the model's cross-entropy ignores). In the forgetting variant
# half of the keys get a new value later in the list, and the latest value is the answer.

RECALL_MIN_LEN = 64


def recall_examples(rng, n, length, vocab, forget=False):
    """n examples of `length` tokens as int64 arrays (x, y): y is -1 but where x is an asked key,
    where it is that key's (latest) value. Token 0 is the blank, keys are 1 .. vocab/2 - 1 and values
    vocab/2 .. vocab - 1. length // 16 distinct keys, each told once (and half of them told again
    with another value, with forget), then all asked once each, in random order, at random even
    offsets of the rest of the sequence."""
    n_pairs, half = length // 16, vocab // 2
    rows = np.arange(n)[:, None]
    keys = rng.random((n, half - 1)).argsort(1)[:, :n_pairs] + 1  # distinct keys per example
    values = rng.integers(half, vocab, size=(n, n_pairs))
    x = np.zeros((n, length), dtype=np.int64)
    y = np.full((n, length), -1, dtype=np.int64)
    x[:, 0:2 * n_pairs:2], x[:, 1:2 * n_pairs:2] = keys, values
    told = 2 * n_pairs
    if forget:  # retell half of the keys, in random order, each with a value other than its first
        again = rng.random((n, n_pairs)).argsort(1)[:, :n_pairs // 2]
        new = half + (values[rows, again] - half + rng.integers(1, half, size=again.shape)) % half
        x[:, told:told + 2 * again.shape[1]:2], x[:, told + 1:told + 2 * again.shape[1]:2] = keys[rows, again], new
        values = values.copy()
        values[rows, again] = new
        told += 2 * again.shape[1]
    asked = rng.random((n, n_pairs)).argsort(1)  # which key each query asks
    slots = rng.random((n, (length - told) // 2)).argsort(1)[:, :n_pairs]
    x[rows, told + 2 * slots] = keys[rows, asked]
    y[rows, told + 2 * slots] = values[rows, asked]
    return x, y


class Recall:
    """Associative-recall batches, made on the fly from (seed, stream, step, rank, split), as Data's are.
    Each batch has one length from 64, 128, ... block_size, drawn at random, and block_size *
    batch_size // length rows: every step trains on the same number of tokens and answers."""

    def __init__(self, cfg):
        if cfg.block_size < RECALL_MIN_LEN:
            raise prepare_data.DataError(f'--dataset={cfg.dataset} needs --block_size of at least {RECALL_MIN_LEN}')
        if cfg.recall_vocab < cfg.block_size // 8 + 2:
            raise prepare_data.DataError(f'--recall_vocab={cfg.recall_vocab} holds too few distinct keys for '
                                         f'{cfg.block_size // 16} pairs; use at least {cfg.block_size // 8 + 2}')
        self.forget = cfg.dataset == 'recall_forget'
        self.lengths = [RECALL_MIN_LEN << i for i in range(int(math.log2(cfg.block_size // RECALL_MIN_LEN)) + 1)]
        self.meta = dict(tokenizer='recall', vocab_size=cfg.recall_vocab, forget=self.forget, lengths=self.lengths)
        self.block_size, self.batch_size, self.seed = cfg.block_size, cfg.batch_size, cfg.seed
        self.needles, self.probes = None, None

    def batch(self, split, step, device, rank=0, stream=0, length=None):
        rng = np.random.default_rng([self.seed, stream, step, rank, split == 'val'])
        length = length or self.lengths[rng.integers(len(self.lengths))]
        x, y = (torch.from_numpy(a) for a in recall_examples(rng, self.block_size * self.batch_size // length,
                                                             length, self.meta['vocab_size'], self.forget))
        if device.type == 'cuda':
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


@torch.no_grad()
def recall_accuracy(model, data, device, ctx, batches):
    """{length: the fraction of answers right}, each answer the argmax at its key, over `batches`
    validation batches of every length (stream 3: not the batches of the loss estimate)."""
    acc = {}
    for L in data.lengths:
        right = total = 0
        for k in range(batches):
            x, y = data.batch('val', k, device, stream=3, length=L)
            with ctx:
                logits, _ = model(x, y)
            asked = y >= 0
            right += (logits.argmax(-1)[asked] == y[asked]).sum().item()
            total += asked.sum().item()
        acc[str(L)] = right / total  # str: the same keys after a round trip through log.jsonl
    return acc


def recall_token(t, vocab):
    return '.' if t == 0 else f'k{t}' if t < vocab // 2 else f'v{t - vocab // 2}'


@torch.no_grad()
def show_recall(model, meta, n, seed, device, ctx):
    """n fresh examples of the shortest length, written k12 for a key and v7 for a value (blanks
    left out), each asked key followed by the model's answer, marked wrong where it is."""
    x, y = (torch.from_numpy(a).to(device) for a in recall_examples(np.random.default_rng(seed), n, meta['lengths'][0],
                                                                     meta['vocab_size'], meta['forget']))
    with ctx:
        logits, _ = model(x, y)
    got = logits.argmax(-1)
    name = lambda t: recall_token(t, meta['vocab_size'])
    for i in range(n):
        words = []
        for t, g, want in zip(x[i].tolist(), got[i].tolist(), y[i].tolist()):
            if want >= 0:
                words.append(f'{name(t)}? {name(g)}' + ('' if g == want else f' (wrong: {name(want)})'))
            elif t:
                words.append(name(t))
        print(' '.join(words))
    asked = y >= 0
    print(f'--------------- {(got[asked] == y[asked]).sum().item()}/{asked.sum().item()} answers right')
