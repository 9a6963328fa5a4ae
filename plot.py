"""
Pictures of a run: its training curves, and what its attention looks at.

$ pip install matplotlib                            # the one extra this script needs
$ python plot.py                                    # out/: curves.png and attention.png
$ python plot.py --out_dirs=out,out-softmax         # curves of several runs overlaid (attention of the first)
$ python plot.py --prompt="the secret number is 31. what is it? " --head=3

curves.png: train and val loss and the task's accuracy where one is logged (the needle; recall
and the copy probe at each length), by step, from each out_dir's log.jsonl. attention.png: for one
prompt, one row per layer and, for one head, the three parts of the score (q.k / sqrt(d_h), the
importance lambda Cbar.Bbar) and the softmax weights they make, with the tokens on the axes.
attention_parts computes them and needs no matplotlib.
"""
import json
import math
import os
import sys
from dataclasses import dataclass

from configurator import check_values, opt, parse_flags


@dataclass
class PlotConfig:
    out_dirs: str = opt('out', 'runs to draw, comma-separated; the attention is the first one\'s')
    prompt: str = opt('', "the attention's prompt ('': a held-out needle question, or a recall example)")
    head: int = opt(0, 'the head whose attention is drawn')
    seed: int = opt(1337, "seed of the needle question or the recall example")

    def __post_init__(self):
        check_values(self, non_negative=('head',))


if __name__ == '__main__':  # read the flags before torch loads, so --help and a bad flag answer at once
    parse_flags(PlotConfig, sys.argv[1:], __doc__)

import numpy as np  # noqa: E402 (after the flags: see above)
import torch  # noqa: E402

import prepare_data  # noqa: E402
from dataset import recall_examples, recall_token  # noqa: E402
from sisa import ssm_channels  # noqa: E402
from train import load_checkpoint, load_model  # noqa: E402


@torch.no_grad()
def attention_parts(model, idx):
    """Each layer's attention for the tokens idx (b, l), split into its parts, in fp32.

    Returns a list with one dict per layer:
        qk: (b, h, l, l), q_i . k_j / sqrt(d_h)
        importance: (b, h, l, l), lambda exp(g_i - g_j) (R(Phi_i) C_i) . (R(Phi_j) B_j); 0 for softmax
        weights: (b, h, l, l), softmax of their sum over j <= i: what the layer averages v with
        v: (b, h, l, d_h); half_life: (h,), ln 2 / mean(-log alpha) over the prompt (inf for softmax)
    The importance is taken pairwise, exp(g_i - g_j) <= 1, so it is exact at any decay.
    """
    inputs = []
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for block in model.transformer.h]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    l = idx.size(1)
    causal = torch.ones(l, l, dtype=torch.bool, device=idx.device).tril()
    parts = []
    for block, x in zip(model.transformer.h, inputs):
        q, k, v, ssm = block.attn.project(x)
        q, k, v = q.float(), k.float(), v.float()
        qk = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        importance, half_life = torch.zeros_like(qk), torch.full((q.size(1),), math.inf)
        if ssm is not None:
            C, B, log_alpha, theta, lam = ssm
            g, RC, RB = ssm_channels(C, B, log_alpha, theta)
            decay = (g[..., :, None] - g[..., None, :]).clamp(max=0).exp()  # exp(g_i - g_j), <= 1 for j <= i
            importance = lam.float()[None, :, None, None] * decay * (RC @ RB.transpose(-2, -1))
            importance = importance.masked_fill(~causal, 0)
            half_life = math.log(2) / -log_alpha.mean(dim=(0, 2))
        weights = (qk + importance).masked_fill(~causal, -math.inf).softmax(-1)
        parts.append(dict(qk=qk.masked_fill(~causal, 0), importance=importance, weights=weights, v=v,
                          half_life=half_life.cpu()))
    return parts


def scores(ev):
    """{name: accuracy in %} of one logged evaluation: the needle, recall and the probe's first letter by length."""
    out = {'needle': 100 * ev['needle_acc']} if 'needle_acc' in ev else {}
    out.update({f'recall at {L}': 100 * a for L, a in ev.get('recall_acc', {}).items()})
    out.update({f'probe at {L}': 100 * first for L, (first, _) in ev.get('probe', {}).items()})
    return out


def plot_curves(out_dirs, path):
    """Train and val loss, and the task's accuracy where one is logged, by step: a line per run (and length)."""
    import matplotlib.pyplot as plt
    logs = {d: [json.loads(line) for line in open(os.path.join(d, 'log.jsonl'))] for d in out_dirs}
    scored = any(scores(h) for log in logs.values() for h in log)
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(11 if scored else 6, 4), squeeze=False)
    for d, log in logs.items():
        steps = [h['iter'] for h in log]
        line, = axes[0, 0].plot(steps, [h['val_loss'] for h in log], label=f'{d} val')
        axes[0, 0].plot(steps, [h['train_loss'] for h in log], '--', color=line.get_color(), label=f'{d} train')
        for name in scores(log[-1]) if scored else ():
            axes[0, 1].plot(steps, [scores(h).get(name, float('nan')) for h in log], label=f'{d} {name}')
    # a log scale: a task's plateau and the drop after it lie far below the first loss
    losses = [h[key] for log in logs.values() for h in log for key in ('train_loss', 'val_loss')]
    ticks = [t for t in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10) if min(losses) / 1.2 <= t <= max(losses) * 1.2]
    axes[0, 0].set(xlabel='step', ylabel='loss (nats per token)', title='loss', yscale='log')
    axes[0, 0].set_yticks(ticks, [f'{t:g}' for t in ticks])
    axes[0, 0].minorticks_off()
    if scored:
        axes[0, 1].set(xlabel='step', ylabel='right (%)', title='held-out accuracy', ylim=(-2, 102))
    for ax in axes[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def plot_attention(parts, tokens, head, path):
    """One row per layer: q.k / sqrt(d_h), the importance, and the softmax weights of one head."""
    import matplotlib.pyplot as plt
    n, side = len(parts), max(4.5, 0.12 * len(tokens))  # inches a panel: room for every token's label
    fig, axes = plt.subplots(n, 3, figsize=(3 * side + 2, (side + 0.6) * n), squeeze=False)
    ticks = range(len(tokens))
    for layer, (row, p) in enumerate(zip(axes, parts)):
        panels = [('q.k / sqrt(d_h)', p['qk'], 'RdBu_r'), ('importance: lambda Cbar.Bbar', p['importance'], 'RdBu_r'),
                  ('softmax weights', p['weights'], 'viridis')]
        for ax, (title, m, cmap) in zip(row, panels):
            m = m[0, head].cpu().numpy()
            bound = max(abs(m).max(), 1e-9)
            im = ax.imshow(m, cmap=cmap, vmin=0 if cmap == 'viridis' else -bound, vmax=bound)
            hl = p['half_life'][head].item()
            ax.set_title(f'layer {layer}, head {head}: {title}' + (f' (half-life {hl:.0f})' if math.isfinite(hl) and
                                                                     'importance' in title else ''), fontsize=9)
            ax.set_xticks(ticks, tokens, fontsize=6, rotation=90)
            ax.set_yticks(ticks, tokens, fontsize=6)
            ax.set(xlabel='key', ylabel='query')
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def main(argv):
    cfg = parse_flags(PlotConfig, argv, __doc__)
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only, no window
    except ImportError:
        sys.exit('error: plot.py draws with matplotlib, an optional extra: pip install matplotlib')
    try:
        out_dirs = cfg.out_dirs.split(',')
        plot_curves(out_dirs, os.path.join(out_dirs[0], 'curves.png'))
        ckpt = load_checkpoint(os.path.join(out_dirs[0], 'ckpt.pt'))
        model, meta = load_model(ckpt, kernel='sdpa').eval(), ckpt['meta']
        if cfg.head >= model.config.n_head:
            raise ValueError(f'--head={cfg.head}: the model has {model.config.n_head} heads')
        if meta['tokenizer'] == 'recall':  # a fresh example of the shortest length, its tokens named k12, v7, .
            x, _ = recall_examples(np.random.default_rng(cfg.seed + 100), 1, meta['lengths'][0], meta['vocab_size'],
                                   meta['forget'])
            ids = x[0].tolist()
            labels = [recall_token(t, meta['vocab_size']) for t in ids]
        else:
            prompt = cfg.prompt
            if not prompt and 'n_digits' in meta:
                prompt = prepare_data.needle_eval_set(1, cfg.seed + 100, min(meta['doc_len'], model.config.block_size),
                                                      meta['n_digits'])[0]['prompt']
            if not prompt:
                raise ValueError('give the attention a prompt: --prompt="..."')
            encode, decode = prepare_data.get_tokenizer(meta)
            ids = encode(prompt)[-model.config.block_size:]
            labels = [repr(decode([t]))[1:-1] for t in ids]
        parts = attention_parts(model, torch.tensor([ids]))
        plot_attention(parts, labels, cfg.head, os.path.join(out_dirs[0], 'attention.png'))
        print(f"wrote {os.path.join(out_dirs[0], 'curves.png')} and {os.path.join(out_dirs[0], 'attention.png')}")
    except (prepare_data.DataError, ValueError, OSError) as e:
        sys.exit(f'error: {e}')
    except KeyboardInterrupt:
        sys.exit('interrupted')


if __name__ == '__main__':
    main(sys.argv[1:])
