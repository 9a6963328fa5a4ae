"""
What every script configures: its flags, the device and the dtype.

Flags are --name=value (a bare --flag is True for a boolean), read over the defaults of a
dataclass whose fields carry their help: `python train.py --help` lists them. A config file
in nanoGPT's style (python assignments: `python train.py config.py --flag=...`) may set them too.
torch is imported only inside the device functions, so --help answers without loading it.
"""
import dataclasses
import difflib
import os
import sys
import types
from dataclasses import field


def opt(default, help):
    """A dataclass field with its --help text."""
    return field(default=default, metadata={'help': help})


def check_values(cfg, positive=(), non_negative=(), choices={}):
    """A ValueError naming the first flag whose value cannot work (parse_flags prints it in one line)."""
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f'--{name} must be > 0, got {getattr(cfg, name)}')
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f'--{name} must be >= 0, got {getattr(cfg, name)}')
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(map(repr, allowed))}; got {getattr(cfg, name)!r}")


def flag_fields(cls):
    """cls's fields that are flags: all but those it inherits and does not read (cls.unused, a tuple of names)."""
    return [f for f in dataclasses.fields(cls) if f.name not in getattr(cls, 'unused', ())]


def foreign_setting(cls, name, value, where):
    """A setting nanoGPT has and cls does not (cls.nanogpt: {name: what happens here}): a note, and it is
    skipped, unless cls.nanogpt_as_here names the one value that does what happens here and it has another:
    then exit. False for any other name."""
    if name not in getattr(cls, 'nanogpt', {}):
        return False
    as_here = getattr(cls, 'nanogpt_as_here', {})
    if name in as_here and convert(name, value, type(as_here[name])) != as_here[name]:
        sys.exit(f"error: {where} is nanoGPT's, with no counterpart here: {cls.nanogpt[name]}")
    if os.environ.get('RANK', '0') == '0':  # once, not once per torchrun process
        print(f"note: {where} is nanoGPT's, ignored here: {cls.nanogpt[name]}")
    return True


def print_help(cls, doc):
    print(doc)
    fields = flag_fields(cls)
    names = [f'--{f.name}={f.default if str(f.default).isprintable() else repr(f.default)}' for f in fields]
    width = min(32, max(map(len, names)))  # a longer default (a url) puts its help on the next line
    for name, f in zip(names, fields):
        gap = '\n' + ' ' * (width + 4) if len(name) > width else ' ' * (width - len(name) + 2)
        print(f'  {name}{gap}{f.metadata.get("help", "")}')


def read_pairs(arg, fields):
    """(name, value) pairs from one argument: --name=value, a bare --flag, or a config file."""
    if not arg.startswith('--'):  # a config file in nanoGPT's style: python assignments
        if not os.path.isfile(arg):
            hint = f"; did you mean --{arg.lstrip('-')}?" if '=' in arg else ''
            sys.exit(f'error: {arg!r} is not a config file (flags are --name=value){hint}')
        scope = {}
        with open(arg) as fh:
            exec(fh.read(), scope)
        return [(k, v) for k, v in scope.items() if not k.startswith('_') and not isinstance(v, types.ModuleType)]
    if '=' not in arg:  # a bare --flag: True for a boolean
        name = arg[2:]
        if name in fields and type(fields[name].default) is not bool:
            sys.exit(f'error: --{name} needs a value: --{name}=VALUE')
        return [(name, 'True')]
    return [arg[2:].split('=', 1)]


def parse_flags(cls, argv, doc):
    """--name=value flags (and optional config files) over the defaults of dataclass cls."""
    fields = {f.name: f for f in flag_fields(cls)}
    values = {}
    for arg in argv:
        if arg in ('-h', '--help'):
            try:
                print_help(cls, doc)
                sys.stdout.flush()
            except BrokenPipeError:  # --help | head: the reader stopped; say nothing more at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        from_file = not arg.startswith('--')
        for name, value in read_pairs(arg, fields):
            if name in getattr(cls, 'unused', ()) and from_file:
                continue  # a training config file read by bench.py or compare.py: what they read counts
            where = f'{name} (in {arg})' if from_file else f'--{name}'
            if name not in fields and foreign_setting(cls, name, value, where):
                continue
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=1)
                sys.exit((f'error: {where} is not a flag' if from_file else f'error: unknown flag {where}')
                         + (f' (did you mean --{close[0]}?)' if close else '')
                         + f'; python {os.path.basename(sys.argv[0])} --help lists them')
            values[name] = convert(name, value, type(fields[name].default))
    try:
        cfg = cls(**values)
    except ValueError as e:
        sys.exit(f'error: {e}')
    cfg.given = frozenset(values)  # what the user set, which a resumed run keeps over the checkpoint's config
    return cfg


def convert(name, value, kind):
    """A flag's text (or a config file's value) as the field's type, or exit with a message."""
    if not isinstance(value, str):
        if kind is str and isinstance(value, bool):  # compile = False, as nanoGPT's config files write it
            return str(value)
        if isinstance(value, kind) or (kind is float and isinstance(value, int)):
            return kind(value)
        sys.exit(f'error: {name} expects {"an" if kind is int else "a"} {kind.__name__}, got {value!r}')
    try:
        if kind is bool:
            if value.lower() not in ('true', 'false', '1', '0'):
                raise ValueError
            return value.lower() in ('true', '1')
        return kind(value)
    except ValueError:
        sys.exit(f'error: --{name} expects {"an" if kind is int else "a"} {kind.__name__}, got {value!r}')


# -----------------------------------------------------------------------------
# device and dtype

# the dtype names people type, and what they mean
DTYPES = {'fp32': 'float32', 'float': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16', 'half': 'float16'}


def pick_device(name):
    """'auto' (cuda, then mps, then cpu) or a device name, checked against this machine."""
    import torch
    mps = getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'mps' if mps else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device={name} is not a device: use auto, cpu, cuda, cuda:N or mps")
    if (device.type == 'cuda' and not torch.cuda.is_available()) or (device.type == 'mps' and not mps) or \
            device.type not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f'--device={name}: there is no such device here; use --device=auto or --device=cpu')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f'--device={name}: this machine has {torch.cuda.device_count()} CUDA devices')
    return device


def pick_dtype(name, device):
    """'auto': bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on MPS and the CPU."""
    import torch
    if name != 'auto':
        return name
    if device.type == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return 'float32'


def autocast(device, dtype):
    """The mixed-precision context for a dtype name: none for fp32."""
    import contextlib
    import torch
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def peak_flops(device, dtype):
    """Dense peak FLOP/s for MFU, where we know it (bf16/fp16 tensor cores)."""
    import torch
    if device.type != 'cuda' or dtype == 'float32':
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in [('H100', 989e12), ('H200', 989e12), ('A100', 312e12), ('L4', 121e12), ('4090', 165e12)]:
        if key in name:
            return flops
    return None


def estimate_mfu(model, tokens_per_sec, device, dtype):
    """Model FLOPs utilization of one device: achieved FLOP/s over its peak (None if unknown).
    Training FLOPs per token: 6N for the weights, plus attention's QK^T (width d_h + d_s for
    SISA) and PV (width d_h), forward and backward, without causal savings (as in nanoGPT)."""
    peak = peak_flops(device, dtype)
    if not peak:
        return None
    cfg = model.config
    d_s = cfg.d_state if cfg.attention == 'sisa' else 0
    attn = 6 * cfg.n_layer * cfg.n_head * cfg.block_size * (2 * cfg.n_embd // cfg.n_head + d_s)
    return (6 * model.get_num_params() + attn) * tokens_per_sec / peak
