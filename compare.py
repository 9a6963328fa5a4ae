"""
SISA against the parameter-matched Transformer: the same seeds, data and schedule, a table of
median [min, max] over seeds.

$ python compare.py                                  # the default needle task, 3 seeds each
$ python compare.py --models=sisa,softmax,paper --seeds=5 --max_iters=2000
$ python compare.py --jobs=4                         # four runs at once, each in its own process

It takes train.py's flags (the task, the model, the schedule) and the three below. Runs go to
out_dir/<model>_seed<seed>/; the table and every run's history to out_dir/compare.json.
"""
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import prepare_data
from configurator import autocast, check_values, opt, parse_flags, pick_device, pick_dtype
from dataset import load_data, needle_accuracy
from train import TrainConfig, load_checkpoint, load_model, train

TITLES = {'sisa': 'SISA', 'softmax': 'Transformer', 'paper': "SISA, paper's offset"}


@dataclass
class CompareConfig(TrainConfig):
    unused = ('init_from', 'sample_tokens', 'attention', 'sisa_offset')  # each run's come from --models
    out_dir: str = opt('out', 'each run goes to out_dir/<model>_seed<seed>/, the table to out_dir/compare.json')
    models: str = opt('sisa,softmax', "models from 'sisa', 'softmax', 'paper' (SISA with the paper's offset)")
    seeds: int = opt(3, 'seeds per model')
    jobs: int = opt(1, 'runs trained at once, each in its own process (small models leave a GPU idle)')

    def __post_init__(self):
        super().__post_init__()
        check_values(self, positive=('seeds', 'jobs'))
        names = self.models.split(',')
        if not names or any(m not in TITLES for m in names):
            raise ValueError(f"--models takes 'sisa', 'softmax' and 'paper', comma-separated; got {self.models!r}")


def steps_to(history, level, score=lambda h: h.get('needle_acc', 0)):
    return next((h['iter'] for h in history if score(h) >= level), None)


def spread(values, fmt='{:.0f}'):
    """'median [min, max]' over seeds; '-' marks a seed that never got there."""
    if any(v is None for v in values):
        got = sorted(v for v in values if v is not None)
        return f"never ({len(got)}/{len(values)} seeds)" if not got else \
            f"{len(got)}/{len(values)} seeds: {', '.join(fmt.format(v) for v in got)}"
    if len(values) == 1:
        return fmt.format(values[0])
    return f'{fmt.format(float(np.median(values)))} [{fmt.format(min(values))}, {fmt.format(max(values))}]'


def trained_model(out_dir, cfg):
    """The checkpoint in out_dir, on cfg's device, in eval mode, with the autocast context to run it in."""
    device = pick_device(cfg.device)
    model = load_model(load_checkpoint(os.path.join(out_dir, 'ckpt.pt')), cfg.kernel).to(device).eval()
    return model, device, autocast(device, pick_dtype(cfg.dtype, device))


@torch.no_grad()
def length_sweep(out_dir, data, cfg, lengths):
    """Needle accuracy of a trained checkpoint at several document lengths (beyond training too)."""
    model, device, ctx = trained_model(out_dir, cfg)
    model.config.block_size = max(lengths)  # RoPE has no table: let it see longer inputs than it trained on
    n_digits = data.meta['n_digits']
    return {L: needle_accuracy(model, data, prepare_data.needle_eval_set(cfg.eval_needles, cfg.seed + 2, L, n_digits),
                               device, ctx) for L in lengths}


@torch.no_grad()
def leak(out_dir, data, cfg):
    """How far the last token reaches back: the largest change of any earlier position's
    log-probabilities when only the last token of a validation window is replaced (the median
    over a batch of windows), and the fraction of earlier positions whose greedy prediction flips.
    0 for a causal model; the paper's clamped offset is not causal."""
    model, device, ctx = trained_model(out_dir, cfg)
    x, _ = data.batch('val', 0, device, stream=2)
    other = x.clone()
    other[:, -1] = (x[:, -1] + 1) % data.meta['vocab_size']
    with ctx:
        a, b = (model(t, t)[0][:, :-1].float().log_softmax(-1) for t in (x, other))
    return dict(max_change=(a - b).abs().amax((1, 2)).median().item(),
                flips=(a.argmax(-1) != b.argmax(-1)).float().mean().item())


def compare_run(run, lengths, threads=0):
    """One model and seed: train it, then its length sweep and its leak. threads: torch's CPU threads
    for this run (0: torch's default), so that runs at once share the cores instead of fighting for them."""
    if threads:
        torch.set_num_threads(threads)
    history = train(run, quiet=True)
    data = load_data(run)
    sweep = length_sweep(run.out_dir, data, run, lengths) if lengths else {}
    return dict(history=history, sweep=sweep, leak=leak(run.out_dir, data, run))


def runs_of(cfg):
    """(model, seed index, TrainConfig) for every run, seeds outermost."""
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    return [(m, s, TrainConfig(**{**base, 'attention': 'softmax' if m == 'softmax' else 'sisa',
                                  'sisa_offset': 'paper' if m == 'paper' else 'exact', 'seed': cfg.seed + s,
                                  'sample_tokens': 0, 'init_from': 'scratch',
                                  'out_dir': os.path.join(cfg.out_dir, f'{m}_seed{cfg.seed + s}')}))
            for s in range(cfg.seeds) for m in cfg.models.split(',')]


def table(cfg, runs, lengths, needle):
    """The rows of the comparison: (name, one 'median [min, max]' per model)."""
    history = next(iter(runs.values()))[0]['history']
    steps = [h['iter'] for h in history]
    marks = sorted({steps[len(steps) // 4], steps[len(steps) // 2], steps[-1]})
    column = lambda f, fmt: [spread([f(r) for r in runs[m]], fmt) for m in runs]
    rows = []
    if needle:
        rows += [(f'steps to {int(level * 100)}% needle', column(lambda r: steps_to(r['history'], level), '{:.0f}'))
                 for level in (0.5, 0.9, 1.0)]
        rows.append(('final needle accuracy', column(lambda r: r['history'][-1]['needle_acc'] * 100, '{:.1f}%')))
    recall = history[0].get('recall_acc', {})
    for level in (0.9, 0.99):
        rows += [(f'steps to {level:.0%} recall at {L}', column(
            lambda r: steps_to(r['history'], level, lambda h: h['recall_acc'][L]), '{:.0f}')) for L in recall]
    rows += [(f'final recall at {L}', column(lambda r: r['history'][-1]['recall_acc'][L] * 100, '{:.1f}%'))
             for L in recall]
    for s in marks:
        rows.append((f'val loss at step {s}',
                     column(lambda r: next(h['val_loss'] for h in r['history'] if h['iter'] == s), '{:.4f}')))
    for L in history[0].get('probe', {}):  # the copy probe, first letter by step and whole value at the end
        rows += [(f'probe at {L}, step {s}: first', column(lambda r: 100 * next(
            h['probe'][L][0] for h in r['history'] if h['iter'] == s), '{:.1f}%')) for s in marks]
        rows.append((f'probe at {L}, step {marks[-1]}: whole', column(lambda r: 100 * r['history'][-1]['probe'][L][1],
                                                                     '{:.1f}%')))
    for L in lengths:
        rows.append((f'needle at length {L}' + (' (> block)' if L > cfg.block_size else ''),
                     column(lambda r: r['sweep'][L] * 100, '{:.1f}%')))
    rows.append(('leak: max change of log p', column(lambda r: r['leak']['max_change'], '{:.2g}')))
    rows.append(('leak: predictions flipped', column(lambda r: r['leak']['flips'] * 100, '{:.2f}%')))
    return rows


def compare(cfg):
    data = load_data(cfg)
    needle = data.needles is not None and cfg.eval_needles > 0
    lengths = [L for L in (cfg.block_size * f // 4 for f in (1, 2, 3, 4, 5, 6))
               if L >= prepare_data.needle_min_len(data.meta.get('n_digits', 2))] if needle else []
    jobs, results = runs_of(cfg), {}
    bar = tqdm(total=len(jobs), desc='compare')

    def done(m, s, r):
        results[m, s] = r
        bar.update(1)
        first = steps_to(r['history'], 1.0)
        last = r['history'][-1]
        bar.write(f"{m} seed {cfg.seed + s}: val loss {last['val_loss']:.4f}"
                  + (f", needle {last['needle_acc']:.0%}, "
                     + ('never 100%' if first is None else f'first 100% at step {first}') if needle else '')
                  + (', recall ' + '/'.join(f'{a:.0%}' for a in last['recall_acc'].values()) if 'recall_acc' in last
                     else ''))

    if cfg.jobs == 1:
        for m, s, run in jobs:
            done(m, s, compare_run(run, lengths))
    else:  # each run in a fresh process; the results are the same as one after another (a test checks)
        workers = min(cfg.jobs, len(jobs))
        threads = max(1, (os.cpu_count() or 1) // workers)
        with torch.multiprocessing.get_context('spawn').Pool(workers) as pool:
            pending = [(m, s, pool.apply_async(compare_run, (run, lengths, threads))) for m, s, run in jobs]
            for m, s, r in pending:
                done(m, s, r.get())
            pool.close()  # let the workers exit by themselves: terminated ones leave semaphores behind
            pool.join()
    bar.close()
    runs = {m: [results[m, s] for s in range(cfg.seeds)] for m in cfg.models.split(',')}
    with open(os.path.join(cfg.out_dir, 'compare.json'), 'w') as f:
        json.dump(dict(config=dataclasses.asdict(cfg), runs=runs), f)
    count = lambda n, noun: f"{n} {noun}{'s' * (n != 1)}"
    print(f"\n{cfg.dataset}, {count(cfg.n_layer, 'layer')} x {cfg.n_embd} wide, {count(cfg.max_iters, 'step')}, "
          f"{count(cfg.seeds, 'seed')} (median [min, max])\n")
    fixed = ', lambda fixed' * cfg.lambda_fixed  # every SISA model's, not the Transformer's
    titles = [TITLES[m] + (fixed if m != 'softmax' else '') for m in runs]
    rows = table(cfg, runs, lengths, needle)
    width = max(28, *(len(t) for t in titles), *(len(v) for _, values in rows for v in values))
    print(f"| {'':<30} | " + ' | '.join(f'{t:<{width}}' for t in titles) + ' |')
    print(f"|{'-' * 32}|" + '|'.join('-' * (width + 2) for _ in runs) + '|')
    for name, values in rows:
        print(f'| {name:<30} | ' + ' | '.join(f'{v:<{width}}' for v in values) + ' |')
    print("leak: the largest change of an earlier position's log-probabilities, and the share of earlier greedy "
          "predictions that flip, when only the last token changes. A causal model gives 0; SISA's one-call form "
          "may show rounding (about 1e-6), since its offset c is taken over the whole sequence.")


def main(argv):
    cfg = parse_flags(CompareConfig, argv, __doc__)
    try:
        compare(cfg)
    except (prepare_data.DataError, ValueError) as e:
        sys.exit(f'error: {e}')
    except KeyboardInterrupt:
        sys.exit('interrupted')


if __name__ == '__main__':
    main(sys.argv[1:])
