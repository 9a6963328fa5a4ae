"""Tests of the pipeline around the model: data preparation and downloads, tokenizers, the
command lines, training, resuming, sampling, torchrun, compare.py and bench.py. The properties
of SISA itself are in test_sisa.py.

Run: python -m pytest -q test_pipeline.py
"""
import contextlib
import dataclasses
import functools
import hashlib
import http.server
import importlib.util
import json
import math
import os
import pickle
import re
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

import bench
import compare as cp
import dataset as ds
import plot
import prepare_data as pd
import sample as sp
import train as tr
from configurator import flag_fields, parse_flags
from prepare_data import DataError
from sisa import GPT, GPTConfig
from test_sisa import HAS_TRITON, device, fast_model, kernels  # noqa: F401 (device: the fixture of every device here)

# =============================================================================
# prepare_data.py


# -----------------------------------------------------------------------------
# download against a local http server

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1 at an ephemeral port; yields (base_url, www_dir, stop)."""
    www = tmp_path / 'www'
    www.mkdir()
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(QuietHandler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True) # short poll, quick shutdown
    thread.start()
    stopped = []
    def stop():
        if not stopped:
            httpd.shutdown()
            httpd.server_close()
            stopped.append(True)
    yield f'http://127.0.0.1:{httpd.server_address[1]}', www, stop
    stop()

def leftovers(folder):
    return [f for f in os.listdir(folder) if f.endswith('.part')]

def test_download_writes_file_with_matching_hash(server, tmp_path):
    url, www, _ = server
    content = b'to be, or not to be\n' * 1000
    (www / 'input.txt').write_bytes(content)
    dest = tmp_path / 'data' / 'x' / 'input.txt'
    assert pd.download(f'{url}/input.txt', str(dest), hashlib.sha256(content).hexdigest()) == str(dest)
    assert dest.read_bytes() == content
    assert leftovers(dest.parent) == []

def test_download_reuses_cached_file_without_network(server, tmp_path):
    url, www, stop = server
    content = b'cached text\n'
    (www / 'input.txt').write_bytes(content)
    dest = tmp_path / 'input.txt'
    sha = hashlib.sha256(content).hexdigest()
    pd.download(f'{url}/input.txt', str(dest), sha)
    stop() # a second fetch would now fail, so passing means the cache was used
    assert pd.download(f'{url}/input.txt', str(dest), sha) == str(dest)
    assert dest.read_bytes() == content

def test_download_with_wrong_hash_keeps_nothing(server, tmp_path):
    url, www, _ = server
    (www / 'input.txt').write_bytes(b'tampered\n')
    dest = tmp_path / 'input.txt'
    with pytest.raises(DataError, match='integrity check failed') as e:
        pd.download(f'{url}/input.txt', str(dest), '0' * 64)
    assert '0' * 64 in str(e.value) and hashlib.sha256(b'tampered\n').hexdigest() in str(e.value)
    assert not dest.exists()
    assert os.listdir(tmp_path) == ['www'] # no temp file either

def test_shakespeare_from_mirror_url(server, tmp_path, monkeypatch):
    url, www, _ = server
    text = 'ROMEO:\nBut, soft! what light through yonder window breaks?\n' * 50
    (www / 'input.txt').write_bytes(text.encode())
    monkeypatch.setattr(pd, 'SHAKESPEARE_SHA256', hashlib.sha256(text.encode()).hexdigest()) # our stand-in file
    pd.main(['--dataset=shakespeare_char', f'--url={url}/input.txt', f'--data_dir={tmp_path / "data"}'])
    data_dir = tmp_path / 'data' / 'shakespeare_char'
    assert (data_dir / 'input.txt').read_text() == text # the raw file is cached beside the bins
    _, decode = pd.get_tokenizer(pd.load_meta(str(data_dir)))
    ids = np.concatenate([np.fromfile(data_dir / f'{s}.bin', dtype=np.uint16) for s in ('train', 'val')])
    assert decode(ids.tolist()) == text

def test_download_unreachable_fails_fast_with_offline_hint(tmp_path):
    with socket.socket() as s: # a port that was just free, so nothing listens there
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    dest = tmp_path / 'shakespeare_char' / 'input.txt'
    t0 = time.time()
    with pytest.raises(DataError) as e:
        pd.download(f'http://127.0.0.1:{port}/input.txt', str(dest), '0' * 64, timeout=2)
    assert time.time() - t0 < 2
    msg = str(e.value)
    assert 'offline' in msg and '--input=' in msg and '--name=shakespeare_char' in msg
    assert not dest.parent.exists() and tmp_path.exists()  # the folder it made is gone, nothing else

# -----------------------------------------------------------------------------
# tokenizers

def test_char_tokenizer_round_trips():
    text = 'Line one: a cat, a dog.\nLine two? Yes!\n'
    encode, decode = pd.get_tokenizer(pd.char_meta(text))
    assert decode(encode(text)) == text
    assert encode('') == [] and decode([]) == ''

def test_char_tokenizer_names_unknown_characters():
    encode, _ = pd.get_tokenizer(pd.char_meta('abc '))
    with pytest.raises(DataError, match=r"characters not in the vocabulary: '@', 'Z'"):
        encode('a Z b @ Z')

def test_gpt2_tokenizer_offline_gives_clear_error(monkeypatch, tmp_path):
    import requests
    import tiktoken
    import tiktoken.load
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path)) # empty cache, so tiktoken must fetch
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, 'gpt2', raising=False)
    def offline(blobpath):
        raise requests.ConnectionError(f'no network for {blobpath}')
    monkeypatch.setattr(tiktoken.load, 'read_file', offline)
    with pytest.raises(DataError) as e:
        pd.get_tokenizer({'tokenizer': 'gpt2', 'vocab_size': 50257})
    msg = str(e.value)
    assert 'tiktoken could not fetch the GPT-2' in msg and 'TIKTOKEN_CACHE_DIR' in msg and '--tokenizer=char' in msg

def test_load_meta_missing_names_the_command(tmp_path):
    with pytest.raises(DataError, match='python prepare_data.py --dataset=needle'):
        pd.load_meta(str(tmp_path / 'needle'))

# -----------------------------------------------------------------------------
# needle

SMALL = dict(doc_len=96, n_digits=2, n_train_docs=300, n_val_docs=40, n_eval=30, seed=7)

def test_needle_docs_fit_and_hold_exactly_one_needle():
    for doc_len, n_digits in [(64, 2), (128, 2), (200, 3)]:
        docs = pd.make_needle_docs(300, seed=1, doc_len=doc_len, n_digits=n_digits)
        for text, answer in docs:
            assert len(text) <= doc_len and text.endswith('\n') and text.count('\n') == 1
            assert len(answer) == n_digits and answer.isdigit()
            assert text.count('the secret number is') == 1
            assert f'the secret number is {answer}.' in text
            assert text.endswith(f'what is it? {answer}\n')
            assert set(text) <= set(pd.NEEDLE_CHARS)
        assert len({len(t) for t, _ in docs}) > 5 # lengths vary
        assert len({t.index('the secret') for t, _ in docs}) > 5 # and so does the needle's place

def test_loguniform_lengths_spread_evenly_over_octaves():
    # as many documents in each octave of length: the median near the geometric mean of the range
    # (uniform puts it near the middle), every document still within doc_len and well formed
    lo, hi = pd.needle_min_len(2), 1024
    uniform, loguniform = ([len(t) for t, _ in pd.make_needle_docs(3000, seed=2, doc_len=hi, lengths=k)]
                           for k in ('uniform', 'loguniform'))
    assert abs(np.median(uniform) - (lo + hi) / 2) < 40
    assert abs(np.median(loguniform) - math.sqrt(lo * hi)) < 20
    octaves = np.histogram(np.log2(loguniform), bins=4, range=(math.log2(lo), math.log2(hi)))[0]
    assert octaves.min() > 0.8 * octaves.max()
    for text, answer in pd.make_needle_docs(300, seed=3, doc_len=hi, lengths='loguniform'):
        assert len(text) <= hi and text.count('the secret number is') == 1 and text.endswith(f'? {answer}\n')


def test_needle_doc_len_too_short_is_a_clear_error():
    with pytest.raises(DataError, match='too short'):
        pd.make_needle_docs(1, seed=0, doc_len=39)

def test_needle_eval_prompts_fill_doc_len_and_end_at_question():
    for item in pd.needle_eval_set(50, seed=3, doc_len=256):
        assert item['prompt'].endswith('what is it? ')
        assert f"the secret number is {item['answer']}." in item['prompt']
        assert 256 - pd.SHORTEST_SENTENCE - 1 < len(item['prompt']) + len(item['answer']) + 1 <= 256

def test_prepare_needle_is_deterministic(tmp_path):
    a = pd.prepare_needle(str(tmp_path / 'a'), **SMALL)
    b = pd.prepare_needle(str(tmp_path / 'b'), **SMALL)
    files = sorted(os.listdir(a))
    assert files == ['eval.json', 'meta.pkl', 'train.bin', 'train_starts.bin', 'val.bin', 'val_starts.bin']
    for f in files:
        assert open(os.path.join(a, f), 'rb').read() == open(os.path.join(b, f), 'rb').read(), f
    c = pd.prepare_needle(str(tmp_path / 'c'), **{**SMALL, 'seed': 8})
    assert open(os.path.join(a, 'train.bin'), 'rb').read() != open(os.path.join(c, 'train.bin'), 'rb').read()

def test_prepare_needle_bins_decode_to_the_documents(tmp_path):
    data_dir = pd.prepare_needle(str(tmp_path), **SMALL)
    meta = pd.load_meta(data_dir)
    assert meta['tokenizer'] == 'char' and meta['doc_len'] == 96 and meta['vocab_size'] == len(pd.NEEDLE_CHARS)
    _, decode = pd.get_tokenizer(meta)
    for split, n, seed in [('train', 300, 7), ('val', 40, 8)]:
        docs = [t for t, _ in pd.make_needle_docs(n, seed, 96, 2)]
        ids = np.fromfile(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16)
        starts = np.fromfile(os.path.join(data_dir, f'{split}_starts.bin'), dtype=np.uint32)
        text = decode(ids.tolist())
        assert text == ''.join(docs)
        assert len(starts) == n and starts[0] == 0
        for s, doc in zip(starts, docs):
            assert text[s:s + len(doc)] == doc
            assert s == 0 or text[s - 1] == '\n'

def test_needle_splits_and_eval_use_different_seeds(tmp_path):
    data_dir = pd.prepare_needle(str(tmp_path), **SMALL)
    meta = pd.load_meta(data_dir)
    _, decode = pd.get_tokenizer(meta)
    def read(split):
        tokens = np.fromfile(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16)
        return set(decode(tokens.tolist()).splitlines())
    train, val = read('train'), read('val')
    with open(os.path.join(data_dir, 'eval.json')) as f:
        evals = json.load(f)
    assert len(evals) == 30
    eval_docs = {e['prompt'] + e['answer'] for e in evals}
    assert val != train and not eval_docs <= train
    assert len(eval_docs & train) < len(eval_docs) // 2 # a few short docs may repeat by chance, most must not
    # every eval prompt encodes with the saved vocabulary
    encode, _ = pd.get_tokenizer(meta)
    for e in evals:
        encode(e['prompt'] + e['answer'])

def test_meta_holds_only_plain_types(tmp_path):
    meta = pd.load_meta(pd.prepare_needle(str(tmp_path), **SMALL))
    def plain(x):
        if isinstance(x, dict):
            return all(plain(k) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(map(plain, x))
        return type(x) in (str, int)
    assert plain(meta)

# -----------------------------------------------------------------------------
# local text files and the command line

def test_input_file_char_round_trips(tmp_path):
    text = ''.join(f'line {i}: the quick brown fox jumps over the lazy dog!\n' for i in range(200))
    path = tmp_path / 'mytext.txt'
    path.write_text(text, encoding='utf-8')
    pd.main([f'--input={path}', '--tokenizer=char', f'--data_dir={tmp_path / "data"}'])
    data_dir = tmp_path / 'data' / 'mytext' # name defaults to the file stem
    meta = pd.load_meta(str(data_dir))
    _, decode = pd.get_tokenizer(meta)
    train = decode(np.fromfile(data_dir / 'train.bin', dtype=np.uint16).tolist())
    val = decode(np.fromfile(data_dir / 'val.bin', dtype=np.uint16).tolist())
    assert train + val == text
    assert len(train) == int(0.9 * len(text))

def test_main_rejects_unknown_flag():
    with pytest.raises(SystemExit) as e:
        pd.main(['--n_digit=3'])
    assert 'unknown flag --n_digit (did you mean --n_digits?)' in str(e.value.code)

def test_main_rejects_wrong_type_and_values_that_cannot_work(tmp_path):
    for flag, message in [('--doc_len=long', '--doc_len expects an int'),
                          ('--n_digits=0', '--n_digits must be > 0'),
                          ('--n_train_docs=0', '--n_train_docs must be > 0'),
                          ('--doc_len=10', '--doc_len=10 is too short')]:
        with pytest.raises(SystemExit) as e:
            pd.main([flag, f'--data_dir={tmp_path}'])
        assert str(e.value.code).startswith('error: ' + message), flag
    assert os.listdir(tmp_path) == []  # nothing left behind

def test_main_prints_data_error_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pd.main([f'--input={tmp_path / "missing.txt"}'])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith('error: cannot read') and 'Traceback' not in err


# =============================================================================
# train.py and sample.py, end to end (tiny: seconds on a CPU)


TINY = ['--block_size=64', '--n_layer=1', '--n_head=2', '--n_embd=32', '--d_state=4', '--batch_size=4',
        '--eval_iters=1', '--eval_needles=10', '--sample_tokens=0', '--warmup_iters=2', '--device=cpu']
BENCH_TINY = [f for f in TINY if f[2:].split('=')[0] not in bench.BenchConfig.unused]  # the model, not the schedule
COMPARE_TINY = [f for f in TINY if f[2:].split('=')[0] not in cp.CompareConfig.unused]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh folder holding a small needle dataset with 64-character documents."""
    monkeypatch.chdir(tmp_path)
    pd.prepare_needle('data', doc_len=64, n_train_docs=300, n_val_docs=50, n_eval=20)
    return tmp_path


def run_train(*flags):
    return tr.train(parse_flags(tr.TrainConfig, TINY + list(flags), ''), quiet=True)


def final_weights(out_dir):
    return tr.load_checkpoint(f'{out_dir}/ckpt.pt')['model']


def test_resume_continues_exactly_where_training_stopped(workdir):
    # warmup longer than the run: the learning rate of step t is the same whatever max_iters says,
    # so a run stopped at 6 and resumed to 10 must equal a run straight to 10
    run_train('--max_iters=10', '--eval_interval=5', '--out_dir=full', '--warmup_iters=50')
    run_train('--max_iters=6', '--eval_interval=3', '--out_dir=part', '--warmup_iters=50')
    ckpt = tr.load_checkpoint('part/ckpt.pt')
    assert ckpt['iter_num'] == 6 and ckpt['meta']['tokenizer'] == 'char'
    history = run_train('--max_iters=10', '--eval_interval=5', '--out_dir=part', '--init_from=resume',
                        '--warmup_iters=50')
    assert [h['iter'] for h in history] == [10]  # step 6 was evaluated before the stop, not again
    assert tr.load_checkpoint('part/ckpt.pt')['iter_num'] == 10
    # same data order and schedule position: no step repeated or lost, so the very same weights
    full, part = final_weights('full'), final_weights('part')
    assert all(torch.equal(full[k], part[k]) for k in full)
    log = [json.loads(line) for line in open('part/log.jsonl')]
    assert [e['iter'] for e in log] == [0, 3, 6, 10]


def test_without_always_save_the_checkpoint_keeps_the_best_val_step_and_says_so(workdir, monkeypatch, capsys):
    # val losses by step as an overfitting run gives them: best at step 10, worse after
    val = {0: 3.0, 10: 2.0, 20: 2.5, 30: 2.2, 40: 2.1}
    monkeypatch.setattr(tr, 'evaluate', lambda model, data, cfg, *a: dict(train_loss=1.0, val_loss=val[iters.pop(0)]))
    iters = [0, 10, 20, 30]
    tr.main(TINY + ['--attention=softmax', '--max_iters=30', '--eval_interval=10', '--always_save_checkpoint=False'])
    ckpt = tr.load_checkpoint('out/ckpt.pt')
    assert (ckpt['iter_num'], ckpt['best_val_loss']) == (10, 2.0)
    assert 'out/ckpt.pt holds step 10, whose val loss 2.0000 no later step beat' in capsys.readouterr().out
    iters[:] = [20, 30, 40]  # resumed from step 10: the best val loss comes with it
    tr.main(TINY + ['--attention=softmax', '--init_from=resume', '--max_iters=40', '--eval_interval=10'])
    assert (tr.load_checkpoint('out/ckpt.pt')['iter_num'], iters) == (10, [])
    # the first run's steps 20 and 30 left the log: the resumed run redid them from step 10
    assert [json.loads(line)['iter'] for line in open('out/log.jsonl')] == [0, 10, 20, 30, 40]
    with open('out/log.jsonl', 'a') as f:
        f.write('{"iter": 5')  # a line a killed run cut short
    tr.trim_log('out/log.jsonl', 30)
    assert [json.loads(line)['iter'] for line in open('out/log.jsonl')] == [0, 10, 20, 30]
    iters[:] = [0, 10, 20, 30]  # the default: a checkpoint at every evaluation, and no such line
    tr.main(TINY + ['--attention=softmax', '--max_iters=30', '--eval_interval=10', '--out_dir=every'])
    assert tr.load_checkpoint('every/ckpt.pt')['iter_num'] == 30 and 'holds step' not in capsys.readouterr().out


def test_ctrl_c_without_always_save_keeps_the_best_val_checkpoint(workdir, monkeypatch, capsys):
    val = {0: 3.0, 10: 2.0, 20: 2.5}
    def evaluate(model, data, cfg, *args):
        step = iters.pop(0)
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during this step's evaluation
        return dict(train_loss=1.0, val_loss=val[step])
    monkeypatch.setattr(tr, 'evaluate', evaluate)
    flags = TINY + ['--attention=softmax', '--max_iters=50', '--eval_interval=10', '--always_save_checkpoint=False']
    iters, stop_at = [0, 10, 20], 20
    with pytest.raises(SystemExit) as e:
        tr.main(flags)
    assert e.value.code == 130 and iters == []
    ckpt = tr.load_checkpoint('out/ckpt.pt')
    assert (ckpt['iter_num'], ckpt['best_val_loss']) == (10, 2.0)  # not step 20's worse weights
    assert ('interrupted at step 20: out/ckpt.pt keeps step 10 (--always_save_checkpoint=False saves only a better '
            'val loss); continue from there with train.py --init_from=resume') in capsys.readouterr().out
    iters, stop_at = [0], 0  # interrupted before any checkpoint: there is none to keep, so it saves
    with pytest.raises(SystemExit):
        tr.main(flags + ['--out_dir=early'])
    assert tr.load_checkpoint('early/ckpt.pt')['iter_num'] == 0
    assert 'interrupted: saved step 0 to early/ckpt.pt' in capsys.readouterr().out


def test_training_lowers_the_loss_and_logs_sisa_diagnostics(workdir):
    history = run_train('--max_iters=40', '--eval_interval=20', '--learning_rate=1e-2')
    assert history[-1]['val_loss'] < history[0]['val_loss'] - 0.5
    layer = history[-1]['layers'][0]
    assert len(layer['lam']) == 2 and layer['half_life'] > 0 and layer['chunked'] == 0.0 and layer['operand'] > 0
    assert 0.0 <= history[-1]['needle_acc'] <= 1.0


def test_attention_flag_trains_the_softmax_baseline_on_the_same_batches(workdir):
    data = tr.load_data(parse_flags(tr.TrainConfig, TINY, ''))
    x1, y1 = data.batch('train', 3, torch.device('cpu'))
    x2, y2 = data.batch('train', 3, torch.device('cpu'))
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(x1, data.batch('train', 4, torch.device('cpu'))[0])
    # every needle window starts at a document's start: a sentence of the grammar
    openings = tuple(pd.SUBJECTS) + ('the secret number',)
    assert all(data.decode(row.tolist()).startswith(openings) for row in x1)
    history = run_train('--max_iters=4', '--eval_interval=4', '--attention=softmax', '--out_dir=soft')
    assert 'layers' not in history[-1]
    assert tr.load_checkpoint('soft/ckpt.pt')['model_args']['attention'] == 'softmax'


def test_needle_accuracy_is_exact_match_of_the_greedy_answer(workdir):
    cfg = parse_flags(tr.TrainConfig, TINY, '')
    data = tr.load_data(cfg)
    model = GPT(tr.model_config(cfg, data.meta['vocab_size'])).eval()
    prompts = data.needles[:8]
    ctx = torch.no_grad()
    # the batched teacher-forced check agrees with decoding each prompt greedily
    acc = ds.needle_accuracy(model, data, prompts, torch.device('cpu'), ctx)
    greedy = []
    for p in prompts:
        idx = torch.tensor([data.encode(p['prompt'])])
        out = model.generate(idx, len(p['answer']), temperature=0)
        greedy.append(data.decode(out[0, idx.size(1):].tolist()) == p['answer'])
    assert acc == sum(greedy) / len(greedy)
    # an oracle that always emits the right answer scores 100%
    class Oracle(torch.nn.Module):
        def forward(self, x, y):
            logits = torch.zeros(*x.shape, data.meta['vocab_size'])
            logits[:, :-1].scatter_(-1, x[:, 1:, None], 1.0)
            return logits, None
    assert ds.needle_accuracy(Oracle(), data, prompts, torch.device('cpu'), ctx) == 1.0


def test_sample_loads_a_compiled_models_checkpoint_and_decodes(workdir, capsys):
    run_train('--max_iters=3', '--eval_interval=3')
    ckpt = tr.load_checkpoint('out/ckpt.pt')
    ckpt['model'] = {'_orig_mod.' + k: v for k, v in ckpt['model'].items()}  # as torch.compile saves it
    tr.save_checkpoint('out/ckpt.pt', ckpt)
    open('prompt.txt', 'w').write('the cat sees a box.')
    sp.main(['--start=FILE:prompt.txt', '--num_samples=2', '--max_new_tokens=7', '--temperature=0'])
    out = capsys.readouterr().out.splitlines()
    samples = [l for l in out if l.startswith('the cat sees a box.')]
    assert len(samples) == 2 and samples[0] == samples[1] and len(samples[0]) == len('the cat sees a box.') + 7
    rates = [l for l in out if l.startswith('--------------- (')]  # only the first sample's rate counts the warm-up
    assert len(rates) == 2 and 'warm-up included' in rates[0] and 'warm-up' not in rates[1]
    assert not os.path.exists('out/ckpt.pt.tmp')


def test_a_char_dataset_prepared_by_nanogpt_trains_and_samples(workdir, capsys):
    # nanoGPT's data/shakespeare_char/prepare.py writes train.bin and val.bin as uint16, as here, and a
    # meta.pkl of vocab_size, itos and stoi with no 'tokenizer'
    text = 'to be, or not to be: that is the question.\n' * 40
    chars = sorted(set(text))
    stoi, itos = {c: i for i, c in enumerate(chars)}, dict(enumerate(chars))
    os.makedirs('data/nano_char')
    for split, part in (('train', text[:1400]), ('val', text[1400:])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(f'data/nano_char/{split}.bin')
    with open('data/nano_char/meta.pkl', 'wb') as f:
        pickle.dump(dict(vocab_size=len(chars), itos=itos, stoi=stoi), f)
    run_train('--dataset=nano_char', '--max_iters=2', '--eval_interval=2', '--out_dir=nano')
    sp.main(['--out_dir=nano', '--start=to be', '--num_samples=1', '--max_new_tokens=5', '--seed=1'])
    out = capsys.readouterr().out
    sample = out[out.index('to be'):out.index('\n---------------')]  # the sample ends at its separator line
    assert len(sample) == len('to be') + 5 and set(sample) <= set(chars)


def test_bad_inputs_get_clear_messages(workdir, monkeypatch):
    def exits(fn, *args):
        with pytest.raises(SystemExit) as e:
            fn(*args)
        return str(e.value.code)
    assert 'unknown flag --batchsize (did you mean --batch_size?)' in exits(tr.main, ['--batchsize=3'])
    assert '--max_iters expects an int' in exits(tr.main, ['--max_iters=many'])
    assert 'python prepare_data.py --dataset=shakespeare_char' in exits(tr.main, ['--dataset=shakespeare_char',
                                                                              '--out_dir=out-nodata'])
    assert not os.path.exists('out-nodata')  # a run that cannot start leaves no folder behind
    assert ('--input=path/to/input.txt --tokenizer=gpt2 --name=shakespeare)'  # GPT-2's tokens, as its name says
            in exits(tr.main, ['--dataset=shakespeare']))
    assert 'too few for block_size' in exits(tr.main, TINY + ['--block_size=100000'])
    assert 'd_state' in exits(tr.main, TINY + ['--d_state=3'])
    assert exits(tr.main, TINY + ['--init_from=resume', '--out_dir=nothing']).endswith(
        'no checkpoint at nothing/ckpt.pt; train one first with python train.py --out_dir=nothing')
    assert exits(sp.main, []).endswith('no checkpoint at out/ckpt.pt; train one first with python train.py')
    assert exits(sp.main, ['--out_dir=my run']).endswith("train one first with python train.py --out_dir='my run'")
    os.makedirs('broken')
    open('broken/ckpt.pt', 'wb').write(b'not a checkpoint')
    assert 'is not a checkpoint' in exits(tr.main, TINY + ['--init_from=resume', '--out_dir=broken'])
    run_train('--max_iters=2', '--eval_interval=2')
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), 'sample.py'), '--start=THE CAT'],
                       capture_output=True, text=True)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert "characters not in the vocabulary: 'A', 'C', 'E', 'H', 'T'" in r.stderr
    def oom(cfg, quiet=False):
        raise torch.cuda.OutOfMemoryError('CUDA out of memory')
    monkeypatch.setattr(tr, 'train', oom)
    assert '--batch_size' in exits(tr.main, TINY)


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(workdir):
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), 'train.py')] + TINY + \
          ['--max_iters=100000', '--eval_interval=100000', '--out_dir=run']
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not os.path.exists('run/log.jsonl') and time.time() < deadline:  # step 0 evaluated: training
        time.sleep(0.2)
    time.sleep(2.0)
    p.send_signal(2)  # SIGINT, as Ctrl-C sends
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 130, out
    step = tr.load_checkpoint('run/ckpt.pt')['iter_num']
    hint = f'saved step {step} to run/ckpt.pt; continue it with train.py --init_from=resume --out_dir=run\n'
    assert step > 0 and hint in out
    assert not os.path.exists('run/ckpt.pt.tmp')
    history = run_train(f'--max_iters={step + 2}', '--eval_interval=100000', '--init_from=resume', '--out_dir=run')
    assert history[-1]['iter'] == step + 2


def test_training_goes_on_uncompiled_where_torch_compile_fails(workdir, monkeypatch, capsys):
    def broken_compile(model, **kwargs):
        def call(*args, **kwargs):
            raise RuntimeError('no C++ compiler found')
        return call
    monkeypatch.setattr(tr.torch, 'compile', broken_compile)
    history = run_train('--max_iters=2', '--eval_interval=2', '--compile=True')
    assert history[-1]['iter'] == 2
    assert 'warning: torch.compile failed (RuntimeError: no C++ compiler found)' in capsys.readouterr().out


def test_the_evaluation_warm_up_leaves_the_model_training_and_the_random_stream_as_they_were():
    # train.py runs one forward as evaluate does before its clock starts; the run must not see it:
    # dropout on again, no gradients, the parameters and torch's generator untouched
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=16, d_state=4, dropout=0.2))
    params = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(20, (2, 16))
    state = torch.get_rng_state()
    tr.warm_up_evaluation(model, (x, x), torch.autocast('cpu', enabled=False))
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None and torch.equal(p, q) for p, q in zip(model.parameters(), params))


def numbers(x):
    """The numbers in a nest of dicts and lists, in order."""
    if isinstance(x, dict):
        return [v for key in sorted(x) for v in numbers(x[key])]
    return [v for item in x for v in numbers(item)] if isinstance(x, list) else [x]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs run on CUDA only')
@pytest.mark.parametrize('attention', ['sisa', 'softmax'])
def test_an_evaluation_from_cuda_graphs_is_the_eager_one(attention):
    # associative recall: batches of three lengths, a graph for each; a replay reads the weights as they are
    # now, and a whole evaluation (losses, recall, SISA's diagnostics) is the eager one
    cuda = torch.device('cuda')
    cfg = recall_flags(f'--attention={attention}', '--eval_iters=6')
    data = tr.load_data(cfg)
    torch.manual_seed(0)
    model = GPT(tr.model_config(cfg, data.meta['vocab_size'])).to(cuda).eval()
    ctx = torch.autocast('cuda', dtype=torch.bfloat16)
    loss_of = ds.Loss(model, ctx, graphs=True)
    with torch.no_grad():
        for step, length in enumerate((64, 128, 64, 256, 128)):
            x, y = data.batch('val', step, cuda, length=length)
            with ctx:
                _, want = model(x, y)
            assert loss_of(x, y).item() == pytest.approx(want.item(), rel=1e-3), length  # (cuBLAS may pick other tiles)
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.02)  # as large as the initial weights: the next replay reads them
    assert sorted(shape[1] for shape in loss_of.graphs) == [64, 128, 256]
    eager, graphed = (ds.evaluate(model, data, cfg, cuda, ctx, graphs=g) for g in (False, True))
    assert numbers(graphed) == pytest.approx(numbers(eager), rel=1e-3, abs=1e-4)


def test_an_evaluation_warns_where_the_importance_nears_fp16s_range_in_the_fused_kernel(monkeypatch):
    cpu = torch.device('cpu')
    cfg = recall_flags('--eval_iters=1', '--eval_needles=0')
    data = tr.load_data(cfg)
    torch.manual_seed(0)
    model = GPT(tr.model_config(cfg, data.meta['vocab_size']))
    with torch.no_grad():
        for block in model.transformer.h:  # B's rows of the SSM projection: entries of R(Phi) B in the 10^5s
            block.attn.c_ssm.weight[:block.attn.n_head * block.attn.d_state].mul_(1e6)
    bf16 = torch.autocast('cpu', dtype=torch.bfloat16)
    evaluation = lambda ctx: ds.evaluate(model, data, cfg, cpu, ctx, graphs=False)
    assert 'operand_warning' not in evaluation(bf16)  # the SDPA form, as on the CPU: no fp16 in it
    monkeypatch.setattr(ds, 'fused_kernel', lambda kernel, device: True)  # as on a GPU
    assert 'operand_warning' not in evaluation(contextlib.nullcontext())  # fp32: the kernel's dots stay fp32
    ev = evaluation(bf16)
    assert ev['operand_warning'] == max(layer['operand'] for layer in ev['layers']) > 65504
    lines = []
    ds.report(dict(ev, iter=0), types.SimpleNamespace(write=lines.append))
    assert "near fp16's 65504" in lines[0] and '--kernel=sdpa' in lines[0]


def test_the_training_line_shows_one_needle_right_in_two_hundred_and_whole_percents_plainly():
    lines = []
    ev = dict(iter=250, train_loss=0.2, val_loss=0.2, needle_acc=1 / 200,
              recall_acc={'64': 1.0, '256': 0.995, '1024': 1999 / 2000, '2048': 1 / 5000})
    ds.report(ev, types.SimpleNamespace(write=lines.append))
    assert 'needle 0.5%' in lines[0] and 'recall 100%/99.5%/99.95%/0.02% at 64/256/1024/2048' in lines[0]


def test_compile_mode_auto_takes_cuda_graphs_only_where_they_are_known_to_work(monkeypatch):
    monkeypatch.setattr(tr, 'fused_kernel', lambda kernel, where: kernel != 'sdpa')  # as on a GPU with Triton
    monkeypatch.delenv('RANK', raising=False)
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    mode = lambda where, *flags: tr.pick_compile_mode(parse_flags(tr.TrainConfig, list(flags), ''), where)
    assert mode(cuda) == mode(cuda, '--attention=softmax') == 'reduce-overhead'
    assert mode(cuda, '--kernel=sdpa', '--attention=softmax') == 'reduce-overhead'
    assert mode(cuda, '--sisa_offset=paper') == 'default'  # not run under CUDA graphs yet
    assert mode(cpu) == 'default'
    assert mode(cuda, '--gradient_accumulation_steps=2') == 'default'
    assert mode(cuda, '--kernel=sdpa') == 'default'  # the chunked SDPA form reads its chunk count on the host
    assert mode(cuda, '--compile_mode=default') == 'default'
    assert mode(cpu, '--compile_mode=max-autotune') == 'max-autotune'
    monkeypatch.setenv('RANK', '0')  # under torchrun: DDP
    assert mode(cuda) == 'default'


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs run on CUDA only')
@pytest.mark.parametrize("attention", ["sisa", "softmax"])
def test_training_under_cuda_graphs_follows_the_default_compile_step_by_step(workdir, attention):
    flags = ['--device=cuda', f'--attention={attention}', '--block_size=256', '--max_iters=30', '--eval_interval=10',
             '--eval_iters=4', '--learning_rate=1e-2']
    runs = {m: run_train(*flags, f'--compile_mode={m}', f'--out_dir={m}') for m in ('auto', 'default')}
    auto = tr.pick_compile_mode(parse_flags(tr.TrainConfig, TINY + flags, ''), torch.device('cuda'))
    assert auto == 'reduce-overhead'
    losses = {m: [h['val_loss'] for h in history] for m, history in runs.items()}
    assert losses['auto'][-1] < losses['auto'][0] - 0.5  # it learned
    assert losses['auto'] == pytest.approx(losses['default'], rel=2e-2)  # bf16: the graphs change no result


def test_lambda_fixed_freezes_lambda_and_nothing_else(workdir):
    run_train('--max_iters=3', '--eval_interval=3', '--lambda_fixed=True', '--out_dir=fixed')
    state = final_weights('fixed')
    init = GPT(tr.model_config(parse_flags(tr.TrainConfig, TINY, ''), 36))
    lam0 = init.transformer.h[0].attn.lambda_raw
    assert torch.equal(state['transformer.h.0.attn.lambda_raw'], lam0)
    assert not torch.equal(state['transformer.h.0.attn.a_bias'], init.transformer.h[0].attn.a_bias)


def test_resume_keeps_the_runs_settings_unless_a_flag_overrides_them(workdir):
    run_train('--max_iters=3', '--eval_interval=3', '--learning_rate=0.02', '--out_dir=first')
    os.rename('first', 'out')  # a run's folder moved: it goes on where it is now (out, the default)
    cfg = parse_flags(tr.TrainConfig, ['--init_from=resume', '--max_iters=5', '--eval_interval=5',
                                          '--device=cpu', '--sample_tokens=0'], '')
    history = tr.train(cfg, quiet=True)
    saved = tr.load_checkpoint('out/ckpt.pt')
    assert saved['iter_num'] == 5 and [h['iter'] for h in history] == [5]
    assert saved['config']['learning_rate'] == 0.02 and saved['config']['batch_size'] == 4  # from the run
    assert saved['config']['eval_interval'] == 5 and saved['config']['max_iters'] == 5      # given now
    assert not os.path.exists('first')


def test_two_processes_under_torchrun_are_the_same_run_as_one(workdir):
    # gradient_accumulation_steps 2: one process runs both micro-steps, or two processes (gloo) one each.
    # Same batches, same averaged gradient, only rank 0 evaluates and writes: the same run.
    train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
    flags = TINY + ['--max_iters=4', '--eval_interval=2', '--gradient_accumulation_steps=2']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONFAULTHANDLER='1')  # a rank that crashes shows where
    launch = {'one': [sys.executable, train_py],
              'two': [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', train_py]}
    for out_dir, cmd in launch.items():
        run = subprocess.run(cmd + flags + [f'--out_dir={out_dir}'], capture_output=True, text=True, timeout=300,
                             env=env)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-8000:]  # a rank's own error precedes torchrun's
    logs = {d: [json.loads(line) for line in open(f'{d}/log.jsonl')] for d in launch}
    assert [h['iter'] for h in logs['one']] == [h['iter'] for h in logs['two']] == [0, 2, 4]  # one writer
    for a, b in zip(logs['one'], logs['two']):
        assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-5)
        assert a['val_loss'] == pytest.approx(b['val_loss'], rel=1e-5)
    one, two = final_weights('one'), final_weights('two')
    init = GPT(tr.model_config(parse_flags(tr.TrainConfig, TINY, ''), 36)).state_dict()
    assert not torch.equal(one['lm_head.weight'], init['lm_head.weight'])  # it trained
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


def test_ctrl_c_under_torchrun_stops_every_process_and_the_run_resumes_under_torchrun(workdir):
    # Ctrl-C reaches the whole process group, as a terminal sends it: every rank finishes its
    # step, they agree to stop, rank 0 saves once (torchrun itself then exits 1 with its own report)
    train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', train_py] + TINY + \
          ['--max_iters=100000', '--eval_interval=5', '--gradient_accumulation_steps=2']
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    deadline = time.time() + 120
    # step 5 saved: both ranks have taken steps, so both hold the handler (a signal sent earlier,
    # before a slow rank installs it, would kill that rank instead, which tests nothing)
    while not os.path.exists('out/ckpt.pt') and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(p.pid, 2)  # SIGINT to torchrun and both workers
    out, _ = p.communicate(timeout=120)
    step = tr.load_checkpoint('out/ckpt.pt')['iter_num']
    assert step > 0 and out.count('interrupted: saved step') == 1 and f'saved step {step}' in out, out[-3000:]
    assert 'tokens per step, eager' in out  # on the CPU nothing is compiled; DDP's wrapper is not compilation
    assert not os.path.exists('out/ckpt.pt.tmp')
    resume = subprocess.run(cmd[:-3] + [f'--max_iters={step + 2}', '--eval_interval=100000', '--init_from=resume',
                                        '--gradient_accumulation_steps=2'],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert resume.returncode == 0, resume.stdout[-2000:] + resume.stderr[-2000:]
    assert tr.load_checkpoint('out/ckpt.pt')['iter_num'] == step + 2
    assert json.loads(open('out/log.jsonl').readlines()[-1])['iter'] == step + 2


def test_the_leak_measure_sees_the_papers_offset_and_not_the_exact_one(workdir):
    # the same weights, made to forget ~2 nats per token (128 over the block, past the clamp's 22)
    run_train('--max_iters=1', '--eval_interval=1')
    ckpt = tr.load_checkpoint('out/ckpt.pt')
    for name, w in ckpt['model'].items():
        if name.endswith('a_bias'):
            w.fill_(2.0)
        if name.endswith('c_ssm.weight'):  # B and C large, w_a: decays that depend on the token
            o = 2 * ckpt['model_args']['n_head'] * ckpt['model_args']['d_state']
            w[:o + ckpt['model_args']['n_head']].normal_(std=1.0, generator=torch.Generator().manual_seed(0))
    for offset in ('exact', 'paper'):
        ckpt['model_args']['sisa_offset'] = offset
        os.makedirs(offset, exist_ok=True)
        tr.save_checkpoint(f'{offset}/ckpt.pt', ckpt)
    cfg = parse_flags(tr.TrainConfig, TINY, '')
    data = tr.load_data(cfg)
    exact, paper = cp.leak('exact', data, cfg), cp.leak('paper', data, cfg)
    assert exact['max_change'] < 1e-5 and exact['flips'] == 0
    assert paper['max_change'] > 1e-3


# -----------------------------------------------------------------------------
# the command line: one line for every bad value, nothing overwritten unasked

def exit_message(fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return str(e.value.code)


@pytest.mark.parametrize("flags, message", [
    (['--batch_size=0'], '--batch_size must be > 0'), (['--n_head=0'], '--n_head must be > 0'),
    (['--n_layer=0'], '--n_layer must be > 0'), (['--eval_interval=0'], '--eval_interval must be > 0'),
    (['--eval_iters=0'], '--eval_iters must be > 0'), (['--block_size=0'], '--block_size must be > 0'),
    (['--gradient_accumulation_steps=0'], '--gradient_accumulation_steps must be > 0'),
    (['--max_iters=-5'], '--max_iters must be >= 0'), (['--dropout=1.5'], '--dropout must be in [0, 1)'),
    (['--device=gpu'], '--device=gpu is not a device'), (['--device=cuda:7'], '--device=cuda:7'),
    (['--dtype=float8'], "--dtype must be one of"), (['--attention=rnn'], "--attention must be one of"),
    (['max_iters=100'], 'did you mean --max_iters=100?'), (['-max_iters=100'], 'did you mean --max_iters=100?'),
    (['--n_layer'], '--n_layer needs a value'),
    (['--compile_mode=reduce-overhead', '--gradient_accumulation_steps=2'], 'loses or refuses accumulated gradients'),
    (['--dataset=recall', '--block_size=32'], '--dataset=recall needs --block_size of at least 64'),
    (['--dataset=recall', '--block_size=256', '--recall_vocab=32'], 'too few distinct keys for 16 pairs'),
    (['--d_state=64'], 'd_state=64 leaves SISA no SwiGLU units'),
])
def test_every_bad_value_stops_with_one_line_naming_its_flag(workdir, flags, message):
    got = exit_message(tr.main, TINY + flags)
    assert message in got and '\n' not in got and 'Traceback' not in got


def test_sample_checks_its_values_and_drops_a_prompt_files_last_newline(workdir, monkeypatch):
    for flag, message in [('--temperature=-1', '--temperature must be >= 0'), ('--top_k=-1', '--top_k must be >= 0'),
                          ('--max_new_tokens=-4', '--max_new_tokens must be > 0'),
                          ('--num_samples=0', '--num_samples must be > 0'), ('--dtype=int8', '--dtype must be one of')]:
        assert message in exit_message(sp.main, [flag])
    assert parse_flags(sp.SampleConfig, ['--dtype=bf16'], '').dtype == 'bfloat16'
    run_train('--max_iters=2', '--eval_interval=2')
    open('prompt.txt', 'w').write('a dog naps. what is it?\n')  # as echo writes it
    prompts = []
    monkeypatch.setattr(GPT, 'generate', lambda self, idx, *a, **k: prompts.append(idx[0].tolist()) or idx)
    sp.main(['--start=FILE:prompt.txt', '--num_samples=1', '--max_new_tokens=2', '--temperature=0'])
    encode, _ = pd.get_tokenizer(tr.load_checkpoint('out/ckpt.pt')['meta'])
    assert prompts == [encode('a dog naps. what is it?')]


def test_a_bare_boolean_flag_means_true_and_dtype_names_have_their_aliases():
    cfg = parse_flags(tr.TrainConfig, ['--lambda_fixed', '--dtype=bf16'], '')
    assert cfg.lambda_fixed is True and cfg.dtype == 'bfloat16'
    assert parse_flags(tr.TrainConfig, ['--dtype=fp16'], '').dtype == 'float16'
    for text, value in (('1', True), ('0', False), ('True', True), ('false', False)):
        assert parse_flags(tr.TrainConfig, [f'--lambda_fixed={text}'], '').lambda_fixed is value, text


def test_a_config_file_may_say_compile_false_as_nanogpts_do(tmp_path):
    path = tmp_path / 'nanogpt_style.py'
    path.write_text('compile = False\nbatch_size = 12\n')
    cfg = parse_flags(tr.TrainConfig, [str(path)], '')
    assert cfg.batch_size == 12 and not tr.use_compile(cfg, torch.device('cuda'))
    assert tr.use_compile(parse_flags(tr.TrainConfig, ['--compile=True'], ''), torch.device('cpu'))


NANOGPT_STYLE = '''# a config file as nanoGPT's users write them, with settings this project has no flag for
import time
n_layer, n_head, n_embd, block_size, dropout = 6, 6, 384, 256, 0.2
max_iters = 5000
log_interval = 10
wandb_log = False
wandb_project = 'tiny'
wandb_run_name = 'run-' + str(int(time.time()))
lr_decay_iters = 5000
'''


def test_a_nanogpt_config_file_is_read_and_its_settings_without_a_counterpart_say_so(tmp_path, capsys):
    path = tmp_path / 'train_tiny.py'
    path.write_text(NANOGPT_STYLE)
    cfg = parse_flags(tr.TrainConfig, [str(path), '--decay_lr=True'], '')
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.dropout, cfg.max_iters) == (6, 384, 256, 0.2, 5000)
    notes = capsys.readouterr().out.splitlines()
    assert [n.split(' ')[1] for n in notes] == ['log_interval', 'wandb_log', 'wandb_project', 'wandb_run_name',
                                                 'lr_decay_iters', '--decay_lr']
    assert notes[4] == (f"note: lr_decay_iters (in {path}) is nanoGPT's, ignored here: the cosine decays over "
                        "--max_iters")
    # a value that asks for another run stops it; so does a name that is no one's
    assert "--eval_only is nanoGPT's, with no counterpart here" in exit_message(
        lambda a: parse_flags(tr.TrainConfig, a, ''), ['--eval_only=True'])
    assert "--decay_lr is nanoGPT's, with no counterpart here" in exit_message(
        lambda a: parse_flags(tr.TrainConfig, a, ''), ['--decay_lr=False'])
    assert "--init_from is nanoGPT's, with no counterpart here" in exit_message(sp.main, ['--init_from=gpt2'])
    path.write_text('eval_intervall = 3\n')
    assert f'eval_intervall (in {path}) is not a flag (did you mean --eval_interval?)' in exit_message(
        lambda a: parse_flags(tr.TrainConfig, a, ''), [str(path)])


def test_help_describes_every_flag_in_aligned_columns(capsys):
    for fn, cls in ((tr.main, tr.TrainConfig), (sp.main, sp.SampleConfig), (pd.main, pd.PrepareConfig),
                    (cp.main, cp.CompareConfig), (bench.main, bench.BenchConfig)):
        exit_message(fn, ['--help'])
        lines = capsys.readouterr().out.splitlines()
        columns, described = set(), 0
        for i, line in enumerate(lines):
            if line.startswith('  --'):
                parts = line[2:].split('  ', 1)
                text = lines[i + 1] if len(parts) == 1 else line  # a long default puts its help on the next line
                start = len(text) - len(text.lstrip()) if len(parts) == 1 else len(line) - len(parts[1].lstrip())
                assert text.strip() and (len(parts) == 1 or parts[1].strip()), line
                columns.add(start)
                described += 1
        assert described == len(flag_fields(cls)) and len(columns) == 1, cls.__name__


def test_the_learning_rate_rises_from_above_zero_to_its_peak_then_falls_to_min_lr():
    cfg = parse_flags(tr.TrainConfig, ['--learning_rate=1e-3', '--min_lr=1e-4', '--warmup_iters=10',
                                       '--max_iters=100'], '')
    lr = [tr.lr_at(it, cfg) for it in range(101)]
    assert 0 < lr[0] and all(a < b for a, b in zip(lr[:10], lr[1:11]))  # step 0 trains too
    assert lr[10] == pytest.approx(1e-3) and lr[100] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lr[10:], lr[11:]))


def test_gradient_accumulation_takes_every_training_batch_once_in_order(workdir, monkeypatch):
    # step s takes micro-batches s G .. s G + G - 1 of the one training stream: none repeated, none skipped
    taken, batch = [], ds.Data.batch
    def recording(self, split, step, device, rank=0, stream=0):
        if split == 'train' and stream == 0:
            taken.append(step)
        return batch(self, split, step, device, rank, stream)
    monkeypatch.setattr(ds.Data, 'batch', recording)
    run_train('--max_iters=3', '--eval_interval=3', '--gradient_accumulation_steps=2')
    assert taken == list(range(6))


def test_an_evaluation_is_the_mean_loss_over_its_own_batches_of_each_split(workdir):
    # eval_iters batches of stream 1, another draw than training's, the val ones from val.bin
    cpu = torch.device('cpu')
    cfg = parse_flags(tr.TrainConfig, TINY + ['--eval_iters=3', '--eval_needles=0'], '')
    data = tr.load_data(cfg)
    torch.manual_seed(0)
    model = GPT(tr.model_config(cfg, data.meta['vocab_size']))
    got = ds.evaluate(model, data, cfg, cpu, contextlib.nullcontext())
    for split in ('train', 'val'):
        batches = [data.batch(split, k, cpu, stream=1) for k in range(3)]
        with torch.no_grad():
            want = np.mean([model(x, y)[1].item() for x, y in batches])
        assert got[f'{split}_loss'] == pytest.approx(want, rel=1e-5), split
        assert not any(torch.equal(x, data.batch(split, k, cpu)[0]) for k, (x, _) in enumerate(batches)), split
    val = open(os.path.join('data', 'needle', 'val.bin'), 'rb').read()
    assert all(row.numpy().astype(np.uint16).tobytes() in val for x, _ in batches for row in x)


def test_a_new_run_never_replaces_another_and_a_resumed_run_keeps_its_model(workdir, capsys):
    run_train('--max_iters=2', '--eval_interval=2')
    saved = open('out/ckpt.pt', 'rb').read()
    log = open('out/log.jsonl').read()
    got = exit_message(tr.main, TINY + ['--attention=softmax'])
    assert '--init_from=resume' in got and '--out_dir' in got and '--overwrite' in got
    for flag in ('--attention=softmax', '--n_embd=64', '--dataset=other', '--block_size=32'):
        got = exit_message(tr.main, TINY + ['--init_from=resume', '--max_iters=4', flag])
        assert 'differs from the run' in got and flag.split('=')[0] in got, flag
    tr.main(TINY + ['--init_from=resume', '--max_iters=2'])  # finished: nothing to do, nothing appended
    assert 'nothing to do' in capsys.readouterr().out
    assert open('out/ckpt.pt', 'rb').read() == saved and open('out/log.jsonl').read() == log
    run_train('--max_iters=2', '--eval_interval=2', '--attention=softmax', '--overwrite')
    assert tr.load_checkpoint('out/ckpt.pt')['model_args']['attention'] == 'softmax'


def test_an_out_dir_that_cannot_be_written_stops_before_training(workdir):
    open('afile', 'w').close()
    got = exit_message(tr.main, TINY + ['--out_dir=afile/run'])
    assert got.startswith('error: --out_dir=afile/run cannot be written')
    open('broken.pt', 'wb').write(os.urandom(1000))
    os.makedirs('junk')
    os.replace('broken.pt', 'junk/ckpt.pt')
    got = exit_message(tr.main, TINY + ['--init_from=resume', '--out_dir=junk'])
    assert 'is not a checkpoint' in got and 'weights_only' not in got


def test_a_checkpoint_of_another_model_gets_a_message_not_a_traceback(workdir):
    run_train('--max_iters=2', '--eval_interval=2')
    ckpt = tr.load_checkpoint('out/ckpt.pt')
    for out_dir, change in (('nano', dict(meta=None)),  # nanoGPT's keys: no data meta
                            ('kv', dict(model_args={**ckpt['model_args'], 'n_kv_head': 2})),
                            ('renamed', dict(model={k + '_': v for k, v in ckpt['model'].items()}))):
        os.makedirs(out_dir)
        torch.save({k: v for k, v in {**ckpt, **change}.items() if v is not None}, f'{out_dir}/ckpt.pt')
    got = exit_message(sp.main, ['--out_dir=nano'])
    assert got == 'error: nano/ckpt.pt is not a checkpoint that train.py wrote (no meta)'
    got = exit_message(sp.main, ['--out_dir=kv'])
    assert got.startswith("error: the checkpoint's model does not load into sisa.py's GPT") and "'n_kv_head'" in got
    got = exit_message(sp.main, ['--out_dir=renamed'])
    assert got.startswith("error: the checkpoint's model does not load into sisa.py's GPT") and 'Missing key' in got
    got = exit_message(tr.main, TINY + ['--init_from=resume', '--out_dir=renamed', '--max_iters=4'])
    assert got.startswith("error: the checkpoint's model does not load into sisa.py's GPT")


def test_eval_needles_zero_trains_without_needle_evaluation(workdir):
    history = run_train('--max_iters=2', '--eval_interval=2', '--eval_needles=0')
    assert [h['iter'] for h in history] == [0, 2] and all('needle_acc' not in h for h in history)


def test_compare_in_parallel_processes_gives_the_table_of_one_after_another(workdir, capsys):
    # every (model, seed) run of compare.py in its own process: the same runs, the same table
    flags = COMPARE_TINY + ['--seeds=2', '--max_iters=4', '--eval_interval=2']
    tables = {}
    for jobs in (1, 2):
        cp.main(flags + [f'--jobs={jobs}', f'--out_dir=jobs{jobs}'])
        heading, tables[jobs] = capsys.readouterr().out.split('\n| ', 1)
        assert heading.endswith('4 steps, 2 seeds (median [min, max])\n')
        runs = json.load(open(f'jobs{jobs}/compare.json'))['runs']
        assert sorted(runs) == ['sisa', 'softmax'] and all(len(r) == 2 for r in runs.values())
        assert os.path.exists(f'jobs{jobs}/softmax_seed1338/ckpt.pt')  # a run's folder names its seed
    one, two = (json.load(open(f'jobs{j}/compare.json'))['runs'] for j in (1, 2))
    for m in one:
        for a, b in zip(one[m], two[m]):
            assert [h['iter'] for h in a['history']] == [h['iter'] for h in b['history']] == [0, 2, 4]
            val_losses = [h['val_loss'] for h in a['history']]
            assert val_losses == pytest.approx([h['val_loss'] for h in b['history']], abs=1e-5)
            assert a['sweep'].keys() == b['sweep'].keys() and len(a['sweep']) > 0
    assert 'steps to 50% needle' in tables[1] and 'needle at length 64' in tables[1] and 'leak' in tables[1]
    assert tables[1].count('\n') == tables[2].count('\n')


def test_compare_names_a_model_it_does_not_know(workdir):
    got = exit_message(cp.main, COMPARE_TINY + ['--models=sisa,rnn'])
    assert '--models' in got and "'sisa,rnn'" in got and '\n' not in got
    # --models sets each run's attention and offset: compare.py has no flags for them, and a config file's pass over
    assert exit_message(cp.main, ['--attention=softmax']).startswith('error: unknown flag --attention')
    open('softmax.py', 'w').write("attention = 'softmax'\nsisa_offset = 'paper'\nseeds = 2\n")
    cfg = parse_flags(cp.CompareConfig, ['softmax.py'], '')
    assert cfg.given == {'seeds'} and [r.attention for _, _, r in cp.runs_of(cfg)] == ['sisa', 'softmax'] * 2


def test_bench_times_both_models_and_prints_their_ratio(workdir, capsys):
    results = bench.benchmark(parse_flags(bench.BenchConfig, BENCH_TINY + ['--iters=5', '--half_life=4'], ''))
    out = capsys.readouterr().out
    assert sorted(results) == ['sisa', 'softmax'] and all(r['tok_s'] > 0 for r in results.values())
    assert abs(results['sisa']['params'] - results['softmax']['params']) <= 3 * 32  # matched to one unit of d_ff
    ratio = results['sisa']['tok_s'] / results['softmax']['tok_s']
    assert f'throughput {ratio:.3f}x' in out and 'half-life 4 tokens' in out and 'vocab 36' in out


def test_bench_sums_a_steps_gpu_time_by_kind_of_kernel():
    # names as torch.profiler reported them on an H200 (torch 2.11), microseconds over 2 steps
    kernels = [('_backward_dkdv', 400.0), ('_forward', 100.0), ('_dropout_bits', 20.0), ('_channels_backward', 30.0),
               ('_cumsum', 2.0), ('cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26', 300.0),
               ('void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*)', 10.0),
               ('nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_NNT', 80.0),
               ('void cublasLt::splitKreduce_kernel<32, 16, int, float>', 4.0),
               ('triton_per_fused__fused_rms_norm_backward__to_copy_add_native_dropout_backward_view_6', 60.0),
               ('triton_poi_fused__to_copy_add_arange_cos_div_mul_neg_pow_select_sin_stack_unsqueeze_view_8', 6.0),
               ('triton_poi_fused__scaled_dot_product_cudnn_attention_transpose_1', 2.0),
               ('void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizerTensorList>', 8.0),
               ('void at::native::reduce_kernel<128, 4>', 2.0)]
    kinds = bench.kernel_kinds(kernels, steps=2)
    assert kinds == {"SISA's attention": 260.0, "SDPA's attention": 155.0, "inductor's fused kernels": 34.0,
                     'matrix products': 42.0, "SISA's channels": 16.0, 'optimizer': 4.0, 'other': 1.0}
    assert list(kinds) == sorted(kinds, key=kinds.get, reverse=True)  # largest first


def test_sample_asks_a_needle_model_held_out_questions_and_marks_each_answer(workdir, capsys):
    run_train('--max_iters=3', '--eval_interval=3')
    capsys.readouterr()
    sp.main(['--num_samples=4'])
    lines = capsys.readouterr().out.splitlines()
    asked = [l for l in lines if 'what is it? ' in l]
    assert len(asked) == 4 and lines[-1] == f"--------------- {sum(l.endswith('   right') for l in asked)}/4 right"
    for line in asked:
        number = line.split('the secret number is ')[1].split('.')[0]
        answer = line.split('what is it? ')[1][:2]
        assert line.endswith('   right') == (answer == number)
        assert line.endswith('   right') or line.endswith(f'wrong: the number is {number}')
    assert not any(l.startswith('note:') for l in lines)
    sp.main(['--num_samples=1', '--temperature=1.5', '--max_new_tokens=9'])  # a needle's answer is greedy
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('note: ') and lines[0].endswith('--max_new_tokens, --temperature apply with --start')
    assert lines[-1] in ('--------------- 0/1 right', '--------------- 1/1 right')


def test_sample_starts_a_text_model_at_a_newline_and_keeps_what_it_printed_on_ctrl_c(workdir, monkeypatch, capsys):
    pd.prepare_text('to be or not to be\nthat is the question\n' * 50, 'text')
    run_train('--dataset=text', '--block_size=32', '--max_iters=2', '--eval_interval=2', '--eval_needles=0')
    capsys.readouterr()
    sp.main(['--num_samples=1', '--max_new_tokens=5', '--temperature=0'])
    out = capsys.readouterr().out
    assert out.startswith('\n') and len(out.split('\n---------------')[0]) == 1 + 5

    def interrupted(self, idx, *args, on_token=None, **kw):
        on_token(idx[:, -1:])  # one token shown, then Ctrl-C
        raise KeyboardInterrupt
    monkeypatch.setattr(GPT, 'generate', interrupted)
    assert 'interrupted' in exit_message(sp.main, ['--start=to be'])
    assert capsys.readouterr().out == 'to bee'


def test_sample_answers_help_without_loading_torch():
    code = ("import runpy, sys; sys.argv = ['sample.py', '--help']\n"
            "try:\n    runpy.run_path('sample.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('torch loaded:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    assert '--max_new_tokens' in r.stdout and r.stdout.strip().endswith('torch loaded: False')


def test_flags_that_only_sisa_has_get_a_note_from_the_transformer(workdir, capsys):
    tr.main(TINY + ['--attention=softmax', '--lambda_fixed', '--max_iters=1', '--eval_interval=1'])
    notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith('note:')]
    assert len(notes) == 1 and '--d_state, --lambda_fixed' in notes[0] and 'ignores them' in notes[0]
    tr.main(TINY + ['--max_iters=1', '--eval_interval=1', '--out_dir=sisa'])
    assert not any(l.startswith('note:') for l in capsys.readouterr().out.splitlines())


def test_a_kernel_that_cannot_run_here_is_refused_before_anything_is_built(workdir, monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)  # test_sisa.py sets it for its own kernel tests
    got = exit_message(tr.main, TINY + ['--kernel=triton'])
    assert "kernel='triton' cannot run here" in got and '\n' not in got and not os.path.exists('out')


def test_ctrl_c_before_training_begins_is_one_line(workdir, monkeypatch):
    def pressed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(tr, 'load_data', pressed)
    assert exit_message(tr.main, TINY) == 'interrupted before training began; nothing was saved'


# -----------------------------------------------------------------------------
# associative recall (dataset.py): made on the fly, scored on the answers only

VOCAB = 4096  # --recall_vocab's default
HALF = VOCAB // 2


def latest_values(row, half=HALF):
    """{position of an asked key: its value}, found the slow way: the last telling of that key
    (a key followed by a value) anywhere before it."""
    answers = {}
    for p, t in enumerate(row):
        told = [row[j + 1] for j in range(p - 1) if row[j] == t and row[j + 1] >= half]
        if 0 < t < half and told and (p + 1 == len(row) or row[p + 1] < half):
            answers[p] = told[-1]
    return answers


@pytest.mark.parametrize('forget', [False, True])
def test_recall_asks_every_key_once_and_its_answer_is_the_latest_value(forget):
    for length, vocab in ((64, 4096), (128, 64), (1024, 4096)):
        x, y = ds.recall_examples(np.random.default_rng(length), 6, length, vocab, forget)
        n_pairs, half = length // 16, vocab // 2
        for row, target in zip(x.tolist(), y.tolist()):
            keys = row[:2 * n_pairs:2]
            assert len(set(keys)) == n_pairs and all(0 < k < half for k in keys)
            assert all(half <= v < vocab for v in row[1:2 * n_pairs:2])
            asked = {p: t for p, t in enumerate(target) if t >= 0}
            assert sorted(row[p] for p in asked) == sorted(keys)  # each key asked once, nothing else scored
            assert asked == latest_values(row, half)
            retold = sum(row[j + 1] != row[row.index(row[j]) + 1] for j in range(2 * n_pairs, len(row) - 1, 2)
                         if 0 < row[j] < half and row[j + 1] >= half)
            assert retold == (n_pairs // 2 if forget else 0)  # half the keys told again, each with a new value


def recall_flags(*flags):
    return parse_flags(tr.TrainConfig, TINY + ['--dataset=recall', '--block_size=256', *flags], '')


def test_recall_batches_hold_the_same_tokens_at_every_length_and_repeat_for_a_seed():
    data = tr.load_data(recall_flags())
    assert data.lengths == [64, 128, 256] and data.meta['vocab_size'] == VOCAB
    cpu = torch.device('cpu')
    shapes = {tuple(data.batch('train', k, cpu)[0].shape) for k in range(30)}
    assert shapes == {(16, 64), (8, 128), (4, 256)}  # batch_size 4 x block 256 tokens each
    a, b, c = data.batch('train', 7, cpu), data.batch('train', 7, cpu), data.batch('val', 7, cpu)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0][:len(a[0])])
    other = tr.load_data(recall_flags('--seed=1')).batch('train', 7, cpu, length=64)
    assert not torch.equal(data.batch('train', 7, cpu, length=64)[0], other[0])


def test_the_loss_counts_the_answers_and_nothing_else():
    cfg = recall_flags()
    data = tr.load_data(cfg)
    model = GPT(tr.model_config(cfg, VOCAB))
    x, y = data.batch('train', 0, torch.device('cpu'), length=128)
    logits, loss = model(x, y)
    asked = y >= 0
    assert asked.sum() == len(x) * 128 // 16
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits[asked], y[asked]))
    grad, = torch.autograd.grad(loss, logits)
    assert (grad[~asked] == 0).all() and (grad[asked] != 0).any()


def test_recall_accuracy_is_100_for_a_model_that_looks_up_and_chance_for_one_that_does_not():
    data = tr.load_data(recall_flags('--dataset=recall_forget'))

    class LookUp(torch.nn.Module):  # answers every asked key with its latest value, read off the input
        def forward(self, x, y):
            logits = torch.zeros(*x.shape, VOCAB)
            for i, row in enumerate(x.tolist()):
                for p, v in latest_values(row).items():
                    logits[i, p, v] = 1.0
            return logits, None

    class FirstValue(LookUp):  # the first telling: right only for the keys never retold
        def forward(self, x, y):
            logits = torch.zeros(*x.shape, VOCAB)
            for i, row in enumerate(x.tolist()):
                for p in latest_values(row):
                    logits[i, p, row[row.index(row[p]) + 1]] = 1.0
            return logits, None

    class Guess(torch.nn.Module):  # ignores the context
        def forward(self, x, y):
            return torch.randn(*x.shape, VOCAB, generator=torch.Generator().manual_seed(0)), None

    cpu, ctx = torch.device('cpu'), torch.no_grad()
    assert ds.recall_accuracy(LookUp(), data, cpu, ctx, 2) == {'64': 1.0, '128': 1.0, '256': 1.0}
    assert all(a == pytest.approx(0.5) for a in ds.recall_accuracy(FirstValue(), data, cpu, ctx, 2).values())
    assert all(a < 0.01 for a in ds.recall_accuracy(Guess(), data, cpu, ctx, 2).values())


def test_train_compare_and_sample_run_associative_recall(workdir, capsys):
    flags = ['--dataset=recall_forget', '--block_size=128', '--max_iters=2', '--eval_interval=2']
    history = run_train(*flags)
    assert [sorted(h['recall_acc']) for h in history] == [['128', '64']] * 2
    assert all(0 <= a <= 1 for a in history[-1]['recall_acc'].values())
    assert tr.load_checkpoint('out/ckpt.pt')['meta']['forget'] is True
    capsys.readouterr()
    sp.main(['--num_samples=2'])
    lines = capsys.readouterr().out.splitlines()
    right, total = map(int, lines[-1].split()[1].split('/'))
    assert total == 2 * 64 // 16 and sum(l.count('? ') for l in lines[:-1]) == total
    assert sum(l.count('(wrong: ') for l in lines[:-1]) == total - right
    assert 'reads no text' in exit_message(sp.main, ['--start=k1'])
    cp.main(COMPARE_TINY + flags + ['--seeds=1', '--out_dir=cmp', '--models=sisa,softmax,paper', '--lambda_fixed'])
    table = capsys.readouterr().out
    assert 'recall_forget, 1 layer x 32 wide, 2 steps, 1 seed (median [min, max])' in table
    assert "| SISA, lambda fixed " in table and "| SISA, paper's offset, lambda fixed" in table
    assert "| Transformer " in table  # lambda is SISA's alone
    assert all(row in table for row in ('steps to 90% recall at 64', 'steps to 99% recall at 128',
                                        'final recall at 128'))


# -----------------------------------------------------------------------------
# the copying corpus (prepare_data.py) and the paper's copy probe (dataset.py)

def test_the_copying_corpus_repeats_its_names_and_facts_and_never_the_probes_phrases(tmp_path):
    a, b = (pd.prepare_copy(str(tmp_path / d), n_train_docs=60, n_val_docs=10) for d in ('a', 'b'))
    assert open(f'{a}/train.bin', 'rb').read() == open(f'{b}/train.bin', 'rb').read()
    text = pd.get_tokenizer(pd.load_meta(a))[1](np.fromfile(f'{a}/train.bin', dtype=np.uint16).tolist())
    stories = text.splitlines()
    assert len(stories) == 60 and sum(map(len, stories)) / 60 == pytest.approx(pd.DOC_LEN * 8, rel=0.2)
    for story in stories:  # every made-up name comes back: copying from earlier in the story pays
        names = {w.strip('.,') for w in story.split() if w[0].isupper()} - {'In', 'Nobody', 'Then', 'The'}
        assert names and all(story.count(n) >= 2 for n in names)
        facts = re.findall(r'The [a-z ]+ of [A-Z][a-z]+ is [A-Za-z]+\.', story)
        assert len(set(facts)) == 2 and all(story.count(f) == 2 for f in facts)  # told, then told again
        capitals = re.findall(r'[A-Z]{2,}', story)  # words in capitals are facts' values, nothing else
        assert all(any(f.endswith(f' is {w}.') for f in facts) for w in capitals)
    assert {c for c in text if c.isupper()} == set(string.ascii_uppercase)
    assert not any(k in text for k in ds.PROBE_KEYS) and ds.PROBE_FILLER.strip() not in text


def test_copy_probe_prompts_hold_one_needle_early_and_end_with_its_key():
    for length in (128, 256, 1024):
        for p in ds.probe_set(40, seed=length, length=length):
            prompt, value = p['prompt'], p['answer']
            assert len(prompt) + len(value) == length and len(value) == 5 and value.isupper()
            key = next(k for k in ds.PROBE_KEYS if prompt.endswith(f'{k} '))
            at = prompt.index(f'{key} {value}. ')
            assert 5 <= at <= length // 2 and prompt.count(value) == 1 and prompt.count(key) == 2
            assert set(prompt) <= set(pd.COPY_CHARS)


class Copier(torch.nn.Module):
    """Predicts the character that followed the last earlier occurrence of the last 8 characters:
    an induction head written out, the ability the probe asks for."""
    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, x, y):
        logits = torch.zeros(*x.shape, self.vocab_size)
        for i, row in enumerate(x.tolist()):
            followed = {}  # 8 characters -> the character after their latest occurrence
            for p in range(7, len(row)):
                gram = tuple(row[p - 7:p + 1])
                if gram in followed:
                    logits[i, p, followed[gram]] = 1.0
                if p + 1 < len(row):
                    followed[gram] = row[p + 1]
        return logits, None


class FirstLetterCopier(Copier):
    """Copier, but only after a space: the answer's first letter right, its later letters wrong."""
    def __init__(self, vocab_size, space):
        super().__init__(vocab_size)
        self.space = space

    def forward(self, x, y):
        logits, _ = super().forward(x, y)
        return logits * (x == self.space)[..., None], None


class Bigram(torch.nn.Module):
    """Predicts the character that most often follows the current one in a training text: knows the
    language, copies nothing."""
    def __init__(self, ids, vocab_size):
        super().__init__()
        self.table = torch.zeros(vocab_size, vocab_size)
        self.table.index_put_((torch.tensor(ids[:-1]), torch.tensor(ids[1:])), torch.tensor(1.0), accumulate=True)

    def forward(self, x, y):
        return self.table[x], None


def test_the_copy_probe_scores_a_model_that_copies_100_and_one_that_does_not_near_chance(workdir):
    pd.prepare_copy('data', n_train_docs=200, n_val_docs=10)
    flags = TINY + ['--dataset=copy', '--block_size=256', '--eval_needles=50']
    data = tr.load_data(parse_flags(tr.TrainConfig, flags, ''))
    assert sorted(data.probes) == [128, 256]  # block_size // 4 is too short for a probe
    cpu, ctx = torch.device('cpu'), torch.no_grad()
    assert all(r == [1.0, 1.0] for r in ds.copy_probe(Copier(data.meta['vocab_size']), data, cpu, ctx).values())
    first_only = FirstLetterCopier(data.meta['vocab_size'], data.meta['stoi'][' '])
    assert all(r == [1.0, 0.0] for r in ds.copy_probe(first_only, data, cpu, ctx).values())
    train_tokens = np.fromfile('data/copy/train.bin', dtype=np.uint16).astype(np.int64).tolist()
    bigram = Bigram(train_tokens, data.meta['vocab_size'])
    for first, whole in ds.copy_probe(bigram, data, cpu, ctx).values():
        assert first < 0.15 and whole == 0.0  # chance for the first of 26 capitals is about 4%


# -----------------------------------------------------------------------------
# the kernels' build for the GPUs they are configured for (Triton compiles without one; minutes cold)

SHARED_MEMORY_SCRIPT = """
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import sisa_kernel as K
out = []
for arch, config, wide in ((75, K.SMALL, {}), (86, K.CONFIG, K.WIDE)):
    for d_s in (16, 32, 64):
        for name, fn in (('forward', K._forward), ('dq', K._backward_dq), ('dkdv', K._backward_dkdv)):
            meta = dict(config[name], **wide.get(d_s, {}).get(name, {}))
            consts = dict(DH=64, DS=d_s, BLOCK=config['BLOCK'], BLOCK_M=meta['BLOCK_M'], BLOCK_N=meta['BLOCK_N'],
                          BLOCKS=32, PRECISION='tf32', DROPOUT=False)
            sig = {a: 'constexpr' if a in consts else '*fp16' if a in ('Q', 'K', 'V', 'O', 'OL', 'DO', 'DQ', 'DK', 'DV')
                   else '*i64' if a == 'SEED' else '*fp32' if a.isupper() and a not in ('H', 'L')
                   else 'fp32' if a in ('scale', 'dropout_p') else 'i32' for a in fn.arg_names}
            kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget('cuda', arch, 32),
                                    options=dict(num_warps=meta['num_warps'], num_stages=meta['num_stages']))
            out.append((arch, d_s, name, kernel.metadata.shared))
print(json.dumps(out))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="sisa_kernel.py needs Triton (pip install triton)")
def test_the_kernels_fit_the_shared_memory_of_the_gpus_they_are_configured_for():
    # A kernel that needs more shared memory than a block may have fails at launch. Compiled here
    # (Triton compiles without a GPU), in a process of its own without TRITON_INTERPRET: SMALL for
    # sm_75 (Turing, as in a T4: 64 kB a block), CONFIG with WIDE's stages for sm_86 (an RTX 30xx:
    # 99 kB; Ada's sm_89 is the same, A100 and H100 have more).
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    run = subprocess.run([sys.executable, '-c', SHARED_MEMORY_SCRIPT], cwd=os.path.dirname(os.path.abspath(__file__)),
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    shared = json.loads(run.stdout.splitlines()[-1])
    assert len(shared) == 18
    limit = {75: 64 * 1024, 86: 99 * 1024}
    for arch, d_s, name, nbytes in shared:
        assert 0 < nbytes <= limit[arch], (arch, d_s, name, nbytes)


# -----------------------------------------------------------------------------
# torch.compile: what train.py runs on CUDA (on the CPU the fused kernel runs interpreted)

def test_a_model_step_on_the_fused_kernel_is_one_graph_for_torch_compile(device):
    if 'triton' not in kernels(device):
        pytest.skip(f'no Triton kernel on {device.type}')
    torch._dynamo.reset()
    model = fast_model(device, 'triton', block_size=32 if device.type == 'cpu' else 256)
    idx = torch.randint(0, 50, (2, model.config.block_size), device=device)
    explained = torch._dynamo.explain(model)(idx, idx)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_a_training_step_with_attention_dropout_on_the_fused_kernel_is_one_graph(device):
    # the kernel's dropout seed is a tensor drawn inside the graph: no sync, no break, no recompile per step
    if 'triton' not in kernels(device):
        pytest.skip(f'no Triton kernel on {device.type}')
    torch._dynamo.reset()
    model = fast_model(device, 'triton', block_size=32 if device.type == 'cpu' else 256, dropout=0.2).train()
    idx = torch.randint(0, 50, (2, model.config.block_size), device=device)
    explained = torch._dynamo.explain(model)(idx, idx)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("attention", ["sisa", "softmax"])
def test_one_compiled_training_step_equals_the_eager_one(device, attention):
    # on the CPU the fused kernel runs interpreted, and the whole step is still one graph
    kernel = kernels(device)[-1]
    one_graph = attention == 'softmax' or kernel == 'triton'  # the SDPA form branches on the data
    l, dtype = (1024, torch.bfloat16) if device.type == 'cuda' else (32, None)
    torch._dynamo.reset()
    steps = []
    for compiled in (False, True):
        model = fast_model(device, kernel, block_size=l, attention=attention, decay=1.0).train()
        run = torch.compile(model, fullgraph=one_graph) if compiled else model
        idx = torch.randint(0, 50, (4, l), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, loss = run(idx, idx)
        loss.backward()
        steps.append((loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters()])))
    (loss_e, grad_e), (loss_c, grad_c) = steps
    assert math.isfinite(loss_c) and loss_c == pytest.approx(loss_e, rel=1e-2 if dtype else 1e-5)
    assert ((grad_c - grad_e).norm() / grad_e.norm()).item() < (5e-2 if dtype else 1e-4)


# -----------------------------------------------------------------------------
# plot.py

@pytest.mark.parametrize("attention, decay", [('sisa', -5.0), ('sisa', 2.0), ('softmax', 0.0)])
def test_attention_parts_reproduce_each_layers_output(attention, decay):
    # decay 2.0: about 2.1 nats a token, 130 over the prompt: more than one SDPA call holds
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32, d_state=4,
                          attention=attention)).eval()
    for block in model.transformer.h:
        if block.attn.sisa:
            block.attn.a_bias.data.fill_(decay)
            torch.nn.init.normal_(block.attn.c_ssm.weight, std=0.3)  # an importance as large as q.k
    outputs = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: outputs.append(out)) for b in model.transformer.h]
    idx = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(1))
    model(idx)
    for hook in hooks:
        hook.remove()
    parts = plot.attention_parts(model, idx)
    for block, p, out in zip(model.transformer.h, parts, outputs):
        assert torch.allclose(p['weights'].sum(-1), torch.ones(2, 2, 64), atol=1e-6)
        assert (p['weights'].triu(1) == 0).all() and (p['importance'].triu(1) == 0).all()
        y = (p['weights'] @ p['v']).transpose(1, 2).reshape(2, 64, 32)
        assert torch.allclose(block.attn.c_proj(y), out, atol=1e-5)
        assert (p['importance'].abs().max() > 0.1) == (attention == 'sisa')


def test_plot_draws_the_curves_of_several_runs_and_the_attention_of_the_first(workdir):
    pytest.importorskip('matplotlib')
    run_train('--max_iters=4', '--eval_interval=2')
    run_train('--max_iters=4', '--eval_interval=2', '--attention=softmax', '--out_dir=soft')
    plot.main(['--out_dirs=out,soft', '--head=1'])
    for name in ('curves.png', 'attention.png'):
        assert open(f'out/{name}', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    fig = plot.plot_curves(['out', 'soft'], 'again.png')
    loss, needle = fig.axes[:2]
    assert len(loss.lines) == 4 and len(needle.lines) == 2  # train and val per run; accuracy per run
    assert list(loss.lines[0].get_xdata()) == [0, 2, 4]


def test_plot_draws_recall_accuracy_at_every_length_and_a_recall_examples_attention(workdir, monkeypatch):
    pytest.importorskip('matplotlib')
    run_train('--dataset=recall', '--recall_vocab=64', '--block_size=128', '--max_iters=2', '--eval_interval=1')
    fig = plot.plot_curves(['out'], 'curves.png')
    accuracy = fig.axes[1]
    assert [l.get_label() for l in accuracy.lines] == ['out recall at 64', 'out recall at 128']
    assert list(accuracy.lines[0].get_xdata()) == [0, 1, 2]
    drawn = []
    monkeypatch.setattr(plot, 'plot_attention', lambda parts, labels, head, path: drawn.append((len(parts), labels)))
    plot.main(['--head=1'])
    (layers, labels), = drawn
    assert layers == 1 and len(labels) == 64 and labels[0].startswith('k') and labels[1].startswith('v')
    names = {'.'} | {f'k{i}' for i in range(1, 32)} | {f'v{i}' for i in range(32)}
    assert labels.count('.') > 0 and set(labels) <= names


def test_a_model_whose_lambda_is_zero_draws_an_empty_importance_panel(workdir):
    pytest.importorskip('matplotlib')
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=16, d_state=4)).eval()
    for block in model.transformer.h:
        block.attn.lambda_raw.data.fill_(-1e4)  # softplus: lambda = 0
    parts = plot.attention_parts(model, torch.randint(0, 20, (1, 16)))
    fig = plot.plot_attention(parts, list('abcdefghijklmnop'), 0, 'maps.png')
    panels = {ax.get_title(): ax.images[0].get_array() for ax in fig.axes if ax.images}
    assert len(panels) == 6 and os.path.exists('maps.png')
    for title, image in panels.items():
        assert (abs(image).max() == 0) == ('importance' in title), title


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib now raises ImportError
    expected = 'error: plot.py draws with matplotlib, an optional extra: pip install matplotlib'
    assert exit_message(plot.main, []) == expected


def test_bench_repeats_alternate_the_models_and_report_the_median_run(workdir, capsys):
    results = bench.benchmark(parse_flags(bench.BenchConfig, BENCH_TINY + ['--iters=5', '--repeats=3'], ''))
    out = capsys.readouterr().out
    timed = [line.split(':')[0].strip() for line in out.splitlines() if 'tok/s' in line and 'params' in line]
    assert timed == ['sisa', 'softmax'] * 3
    for attention in ('sisa', 'softmax'):  # the run reported is the middle one of the three by tok/s
        speeds = sorted(float(line.split(', ')[1].split()[0].replace(',', '')) for line in out.splitlines()
                        if line.strip().startswith(f'{attention}:'))
        assert f"{results[attention]['tok_s']:,.0f}" == f'{speeds[1]:,.0f}'
    assert 'median of 3 timings each; the ratio in each repeat: ' in out


def test_a_bench_shape_sets_its_flags_and_flags_given_win(workdir, capsys):
    flags = ['--shape=tiny', '--n_layer=1', '--n_embd=32', '--n_head=2', '--block_size=32', '--batch_size=2',
             '--iters=5', '--device=cpu']
    bench.main(flags)
    header = capsys.readouterr().out.splitlines()[0]
    assert 'batch 2 x 32, 1 x 32, d_state 16, vocab 65' in header  # d_state, vocab from the shape; the rest given


def test_bench_lists_and_takes_only_the_training_flags_it_reads(workdir, capsys):
    exit_message(bench.main, ['--help'])
    listed = {line.split('=')[0].strip() for line in capsys.readouterr().out.splitlines() if line.startswith('  --')}
    assert {'--n_layer', '--dtype', '--weight_decay', '--iters'} <= listed
    assert not listed & {'--out_dir', '--max_iters', '--eval_interval', '--learning_rate', '--sample_tokens'}
    got = exit_message(bench.main, ['--max_iters=3'])
    assert got.startswith('error: unknown flag --max_iters (did you mean --iters?)')
    # a training config file sets the model; its schedule and evaluation are not the benchmark's
    open('train_config.py', 'w').write('max_iters = 5000\neval_interval = 100\nn_layer = 1\n')
    cfg = parse_flags(bench.BenchConfig, ['train_config.py'], '')
    assert cfg.n_layer == 1 and cfg.given == {'n_layer'}
    assert parse_flags(tr.TrainConfig, ['train_config.py'], '').max_iters == 5000  # train.py reads them all


def test_the_lab_config_sets_the_lab_in_train_and_compare():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', 'lab.py')
    cfg = parse_flags(tr.TrainConfig, [path], '')
    assert (cfg.dataset, cfg.block_size, cfg.max_iters, cfg.eval_interval, cfg.out_dir) == ('needle48', 48, 2000, 100,
                                                                                              'out-lab')
    cfg = parse_flags(cp.CompareConfig, [path, '--seeds=5', '--jobs=2'], '')
    assert (cfg.dataset, cfg.seeds, cfg.jobs) == ('needle48', 5, 2)


def test_the_recall_config_sets_the_smallest_recall_setting():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', 'recall.py')
    cfg = parse_flags(tr.TrainConfig, [path, '--attention=softmax'], '')
    got = (cfg.dataset, cfg.recall_vocab, cfg.block_size, cfg.n_embd, cfg.attention)
    assert got == ('recall', 64, 64, 128, 'softmax')
    assert tr.load_data(cfg).lengths == [64]


def test_the_shakespeare_configs_set_nanogpts_model_and_a_cpus_and_both_models_match_in_size():
    # every value each file sets: nanoGPT's tiny Shakespeare model (config/train_shakespeare_char.py there)
    # and the CPU's smaller one whose run docs/results.md records
    both = dict(dataset='shakespeare_char', out_dir='out-shakespeare', d_state=16, learning_rate=1e-3, min_lr=1e-4,
                weight_decay=0.1, always_save_checkpoint=False)
    want = {'shakespeare_char.py': dict(both, block_size=256, batch_size=64, n_layer=6, n_head=6, n_embd=384,
                                        dropout=0.2, beta2=0.99, max_iters=5000, eval_interval=250),
            'shakespeare_char_cpu.py': dict(both, block_size=128, n_layer=4, n_head=4, n_embd=128, max_iters=1000,
                                            eval_interval=250)}
    for name, values in want.items():
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', name)
        cfg = parse_flags(tr.TrainConfig, [path], '')
        assert {k: getattr(cfg, k) for k in values} == values, name
        assert cfg.given == set(values), name  # and nothing else
        with torch.device('meta'):  # the shapes only: each model builds, and SISA matches the Transformer's size
            n = {a: GPT(tr.model_config(dataclasses.replace(cfg, attention=a), 65)).get_num_params()
                 for a in ('sisa', 'softmax')}
        assert abs(n['sisa'] - n['softmax']) / n['softmax'] < 1e-3, (name, n)


def test_ctrl_c_in_any_script_is_one_line(workdir, monkeypatch):
    def pressed(*args, **kwargs):
        raise KeyboardInterrupt
    scripts = [(pd, 'prepare_needle', pd.main), (cp, 'compare', cp.main), (bench, 'benchmark', bench.main)]
    if importlib.util.find_spec('matplotlib'):  # plot.py stops before drawing without it (a test above)
        scripts.append((plot, 'plot_curves', plot.main))
    for module, name, fn in scripts:
        monkeypatch.setattr(module, name, pressed)
        assert exit_message(fn, []) == 'interrupted', module.__name__


def test_progress_into_a_file_is_a_plain_line_every_30_seconds_not_a_redrawn_bar(workdir):
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')] + TINY + \
          ['--max_iters=200', '--eval_interval=1000']
    t0 = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # stderr a pipe, as a log file is
    assert run.returncode == 0, run.stderr[-2000:]
    # no bar redrawn by carriage returns, but plain lines: after the first step, every 30 s, after the last
    # (a busy machine takes longer, so the bound grows with the wall time)
    assert '\r' not in run.stdout + run.stderr and '/200' not in run.stderr
    steps = [line for line in run.stdout.splitlines() if re.match(r'step \d+/200: loss \d', line)]
    assert steps[0].startswith('step 1/200') and steps[-1].startswith('step 200/200')
    assert len(steps) <= 2 + (time.time() - t0) // 30 and 'elapsed' in steps[-1]
