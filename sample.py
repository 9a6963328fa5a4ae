"""
Sample from a trained model.

$ python sample.py                                   # out/ckpt.pt: needle questions and its answers, or text
$ python sample.py --start="the secret number is 31. what is it? " --num_samples=1 --max_new_tokens=3 --temperature=0
$ python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_k=20

With no --start, a needle model is asked held-out questions (fresh documents, answered greedily,
each marked right or wrong), an associative-recall model answers fresh examples, and a text
model samples from a newline, the start of a line of the data.
"""
import sys
import time
from dataclasses import dataclass

from configurator import DTYPES, autocast, check_values, opt, parse_flags, pick_device, pick_dtype


@dataclass
class SampleConfig:
    out_dir: str = opt('out', 'where ckpt.pt lies')
    start: str = opt('', "the prompt, or FILE:path to read it from a file ('': the dataset's own start, see above)")
    num_samples: int = opt(3, 'samples to draw (questions to ask, for a needle model)')
    max_new_tokens: int = opt(200, 'tokens per sample')
    temperature: float = opt(0.8, '0: always the most likely token; higher: more random')
    top_k: int = opt(0, 'keep only the top k tokens (0: all)')
    seed: int = opt(1337, 'random seed (and of the needle questions)')
    device: str = opt('auto', "'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'")
    use_cache: bool = opt(True, 'cached decoding, one step per token (the same tokens as without)')
    dtype: str = opt('auto', "'auto' (as train.py: bf16 on CUDA, fp16 where bf16 is unsupported, else fp32), "
                             "'float32', 'bfloat16', 'float16'")

    # nanoGPT's flags that sample.py has not (configurator.foreign_setting)
    nanogpt = dict(init_from="the model comes from out_dir/ckpt.pt, as nanoGPT's init_from='resume'; GPT-2's "
                             "weights are not loaded here",
                   compile='sampling runs eager: each step is one token on cached keys')
    nanogpt_as_here = dict(init_from='resume')

    def __post_init__(self):
        self.dtype = DTYPES.get(self.dtype, self.dtype)
        check_values(self, positive=('num_samples', 'max_new_tokens'), non_negative=('temperature', 'top_k'),
                     choices=dict(dtype=('auto', 'float32', 'bfloat16', 'float16')))


if __name__ == '__main__':  # read the flags before torch loads, so --help and a bad flag answer at once
    parse_flags(SampleConfig, sys.argv[1:], __doc__)

import torch  # noqa: E402 (after the flags: see above)

import prepare_data  # noqa: E402
from dataset import show_recall  # noqa: E402
from train import load_checkpoint, load_model  # noqa: E402


def read_start(start):
    if not start.startswith('FILE:'):
        return start
    try:
        with open(start[5:], encoding='utf-8') as f:
            text = f.read()
    except OSError as e:
        raise prepare_data.DataError(f'cannot read the prompt file: {e}')
    return text[:-1] if text.endswith('\n') else text  # echo's newline would start a new document


def ask_needles(model, meta, cfg, device, ctx):
    """Held-out needle questions, answered greedily, each marked right or wrong."""
    encode, decode = prepare_data.get_tokenizer(meta)
    doc_len = min(meta['doc_len'], model.config.block_size)
    # full-length documents from seed + 100: not prepare_data's seeds (seed, seed + 1, seed + 2)
    questions = prepare_data.needle_eval_set(cfg.num_samples, cfg.seed + 100, doc_len, meta['n_digits'])
    right = 0
    for q in questions:
        x = torch.tensor([encode(q['prompt'])], dtype=torch.long, device=device)
        with ctx:
            y = model.generate(x, len(q['answer']), temperature=0, use_cache=cfg.use_cache)
        answer = decode(y[0, x.size(1):].tolist())
        right += answer == q['answer']
        verdict = '   right' if answer == q['answer'] else f"   wrong: the number is {q['answer']}"
        print(q['prompt'] + answer + verdict)
    print(f'--------------- {right}/{len(questions)} right')


def sample_text(model, meta, cfg, device, ctx):
    """num_samples samples from --start (a newline if none), printed as they come."""
    encode, decode = prepare_data.get_tokenizer(meta)
    ids = encode(read_start(cfg.start) or '\n')
    if not ids:
        raise prepare_data.DataError('the prompt is empty')
    if len(ids) > model.config.block_size:
        print(f'note: the prompt has {len(ids)} tokens; the model sees the last {model.config.block_size}')
    x = torch.tensor([ids], dtype=torch.long, device=device)
    show = lambda token: print(decode(token[0].tolist()), end='', flush=True)
    for n in range(cfg.num_samples):
        t0 = time.time()
        print(decode(ids), end='', flush=True)
        with ctx:
            model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                           use_cache=cfg.use_cache, on_token=show)
        warm_up = ', warm-up included' if n == 0 else ''  # the first call's: seconds of it on a fresh GPU
        print(f'\n--------------- ({cfg.max_new_tokens / (time.time() - t0):.0f} tokens/s{warm_up})')


def sample(cfg):
    ckpt = load_checkpoint(f'{cfg.out_dir}/ckpt.pt')
    device = pick_device(cfg.device)
    model = load_model(ckpt).eval().to(device)
    dtype = pick_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    if ckpt['meta']['tokenizer'] == 'recall':  # an associative-recall model: tokens, not text
        if cfg.start:
            raise prepare_data.DataError('an associative-recall model reads no text; without --start it answers '
                                         'fresh examples')
        show_recall(model, ckpt['meta'], cfg.num_samples, cfg.seed, device, autocast(device, dtype))
    elif not cfg.start and 'n_digits' in ckpt['meta']:  # a needle model
        unused = [f'--{name}' for name in ('max_new_tokens', 'temperature', 'top_k') if name in cfg.given]
        if unused:
            print(f"note: a needle model answers its questions greedily, as many tokens as each answer; "
                  f"{', '.join(unused)} apply with --start")
        ask_needles(model, ckpt['meta'], cfg, device, autocast(device, dtype))
    else:
        sample_text(model, ckpt['meta'], cfg, device, autocast(device, dtype))


def main(argv):
    cfg = parse_flags(SampleConfig, argv, __doc__)
    try:
        sample(cfg)
    except KeyboardInterrupt:  # what was printed stays on the screen
        sys.exit('\ninterrupted')
    except (prepare_data.DataError, ValueError) as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main(sys.argv[1:])
