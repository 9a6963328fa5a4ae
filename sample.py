"""
Sample from a trained model.

$ python sample.py                                   # from out/ckpt.pt
$ python sample.py --start="the secret number is 31. what is it? " --num_samples=1 --max_new_tokens=3 --temperature=0
$ python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_k=20
"""
import contextlib
import sys
import time
from dataclasses import dataclass

import torch

import prepare_data
from sisa import GPT, GPTConfig
from prepare_data import check_values, opt, parse_flags
from train import DTYPES, clean_state_dict, load_checkpoint, pick_device


@dataclass
class SampleConfig:
    out_dir: str = opt('out', 'where ckpt.pt lies')
    start: str = opt('\n', 'the prompt, or FILE:path to read it from a file (one trailing newline is dropped)')
    num_samples: int = opt(3, 'samples to draw')
    max_new_tokens: int = opt(200, 'tokens per sample')
    temperature: float = opt(0.8, '0: always the most likely token; higher: more random')
    top_k: int = opt(0, 'keep only the top k tokens (0: all)')
    seed: int = opt(1337, 'random seed')
    device: str = opt('auto', "'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'")
    use_cache: bool = opt(True, 'cached decoding, one step per token (the same tokens as without)')
    dtype: str = opt('auto', "'auto' (bf16 on CUDA where supported, else fp32), 'float32', 'bfloat16', 'float16'")

    def __post_init__(self):
        self.dtype = DTYPES.get(self.dtype, self.dtype)
        check_values(self, positive=('num_samples', 'max_new_tokens'), non_negative=('temperature', 'top_k'),
                     choices=dict(dtype=('auto', 'float32', 'bfloat16', 'float16')))


def main(argv):
    cfg = parse_flags(SampleConfig, argv, __doc__)
    ckpt = load_checkpoint(f'{cfg.out_dir}/ckpt.pt')
    device = pick_device(cfg)
    model = GPT(GPTConfig(**{**ckpt['model_args'], 'kernel': 'auto'}))  # the kernel is where it runs
    model.load_state_dict(clean_state_dict(ckpt['model']))
    model.eval().to(device)
    encode, decode = prepare_data.get_tokenizer(ckpt['meta'])

    start = cfg.start
    if start.startswith('FILE:'):
        try:
            with open(start[5:], encoding='utf-8') as f:
                start = f.read()
            start = start[:-1] if start.endswith('\n') else start  # echo's newline would start a new document
        except OSError as e:
            raise prepare_data.DataError(f'cannot read the prompt file: {e}')
    ids = encode(start)
    if not ids:
        raise prepare_data.DataError('the prompt is empty')
    if len(ids) > model.config.block_size:
        print(f'note: the prompt has {len(ids)} tokens; the model sees the last {model.config.block_size}')
    x = torch.tensor([ids], dtype=torch.long, device=device)
    if cfg.dtype == 'auto':
        dtype = torch.bfloat16 if device.type == 'cuda' and torch.cuda.is_bf16_supported() else None
    else:
        dtype = None if cfg.dtype == 'float32' else getattr(torch, cfg.dtype)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    torch.manual_seed(cfg.seed)
    for _ in range(cfg.num_samples):
        t0 = time.time()
        with ctx:
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature,
                               top_k=cfg.top_k or None, use_cache=cfg.use_cache)
        print(decode(y[0].tolist()))
        print(f'--------------- ({cfg.max_new_tokens / (time.time() - t0):.0f} tokens/s)')


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (prepare_data.DataError, ValueError) as e:
        sys.exit(f'error: {e}')
