"""
Prepare a dataset in nanoGPT's layout: data/<name>/train.bin, val.bin (uint16 token ids)
and meta.pkl (how to encode and decode). Four ways in:

$ python prepare_data.py                              # synthetic needle-in-a-haystack (default)
$ python prepare_data.py --dataset=copy               # synthetic stories whose made-up names recur
$ python prepare_data.py --dataset=shakespeare_char   # tiny shakespeare, one token per character
$ python prepare_data.py --dataset=shakespeare        # tiny shakespeare, GPT-2 BPE via tiktoken
$ python prepare_data.py --input=notes.txt --tokenizer=char   # any local text file

The needle dataset is the paper's retrieval test at toy scale: "the secret number is 42."
hidden among filler sentences, then "what is it? 42". The copying corpus is for the paper's own
protocol: language-model training, then a zero-shot copy probe (dataset.py). Both need no
download and are the same bytes for the same seed.
"""
import hashlib
import json
import math
import os
import pickle
import random
import string
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import tiktoken
from tqdm import tqdm

from configurator import check_values, opt, parse_flags

# needle defaults (each one is also a --flag)
DOC_LEN = 64         # max characters per document, question, answer and '\n' included
N_DIGITS = 2         # digits of the secret number
N_TRAIN_DOCS = 20000
N_VAL_DOCS = 1000
N_EVAL = 200         # held-out prompts written to eval.json
SEED = 1337          # train docs use seed, val docs seed+1, eval prompts seed+2

SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SHAKESPEARE_SHA256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'


class DataError(Exception):
    """A problem the user can fix (offline, missing file, bad text); main() prints it, no traceback."""

# -----------------------------------------------------------------------------
# tokenizers: meta.pkl holds only plain types, so checkpoints can embed it and still load
# with torch.load(weights_only=True)

def char_meta(chars):
    chars = sorted(set(chars))
    return {'tokenizer': 'char', 'vocab_size': len(chars),
            'itos': {i: c for i, c in enumerate(chars)}, 'stoi': {c: i for i, c in enumerate(chars)}}

def get_tokenizer(meta):
    """Returns (encode, decode) for a meta dict: encode(str) -> list[int], decode(list[int]) -> str."""
    if meta.get('tokenizer') == 'char':
        stoi, itos = meta['stoi'], meta['itos']
        def encode(s):
            try:
                return [stoi[c] for c in s]
            except KeyError:
                missing = sorted(set(s) - set(stoi))
                raise DataError('characters not in the vocabulary: ' + ', '.join(map(repr, missing))) from None
        def decode(ids):
            return ''.join(itos[i] for i in ids)
        return encode, decode
    if meta.get('tokenizer') == 'gpt2':
        try:
            enc = tiktoken.get_encoding('gpt2')
        except Exception as e: # tiktoken fetches its BPE files with requests; offline that fails deep inside
            raise DataError(
                "tiktoken could not fetch the GPT-2 BPE files. This needs network access once, or a "
                "TIKTOKEN_CACHE_DIR that already holds them. The character tokenizer (--tokenizer=char) "
                f"works offline. ({type(e).__name__}: {e})") from None
        return (lambda s: enc.encode(s, allowed_special={'<|endoftext|>'})), enc.decode
    raise DataError(f"unknown tokenizer {meta.get('tokenizer')!r} in meta.pkl, expected 'char' or 'gpt2'")

def load_meta(data_dir):
    path = os.path.join(data_dir, 'meta.pkl')
    if not os.path.exists(path):
        name = os.path.basename(os.path.normpath(data_dir))
        cmd = (f'python prepare_data.py --dataset={name}' if name in DATASETS else
               f'python prepare_data.py --input=path/to/file.txt --name={name}')
        raise DataError(f'no meta.pkl in {data_dir}; prepare the dataset first with: {cmd}')
    with open(path, 'rb') as f:
        meta = pickle.load(f)
    if 'tokenizer' not in meta and 'stoi' in meta:  # nanoGPT's shakespeare_char/prepare.py wrote it
        meta['tokenizer'] = 'char'
    return meta

def write_split(data_dir, split, ids):
    # uint16 is what nanoGPT memmaps; fine for GPT-2's 50257 tokens and for any char vocab we allow
    np.array(ids, dtype=np.uint16).tofile(os.path.join(data_dir, f'{split}.bin'))

def write_meta(data_dir, meta):
    with open(os.path.join(data_dir, 'meta.pkl'), 'wb') as f:
        pickle.dump(meta, f)

# -----------------------------------------------------------------------------
# needle in a haystack: a tiny grammar of filler sentences, one needle, one question

SUBJECTS = ['the cat', 'a dog', 'the owl', 'a fox', 'my hen', 'the kid']
VERBS = ['sees', 'has', 'wants', 'finds', 'likes']
ADJECTIVES = ['red', 'big', 'wet', 'tiny', 'dull']
OBJECTS = ['box', 'cup', 'hat', 'map', 'drum']
INTRANSITIVE = ['naps', 'runs', 'sings', 'waits']
NEEDLE = 'the secret number is {}.'
QUESTION = 'what is it? {}\n'   # the '\n' ends the document
# every character the generator can write, so any prompt encodes, not only those that occurred
NEEDLE_CHARS = sorted(set(''.join(SUBJECTS + VERBS + ADJECTIVES + OBJECTS + INTRANSITIVE)
                          + NEEDLE.format('') + QUESTION.format('') + '0123456789'))
SHORTEST_SENTENCE = min(len(f'{s} {v}.') for s in SUBJECTS for v in INTRANSITIVE)

def filler_sentence(rng):
    subject, kind = rng.choice(SUBJECTS), rng.randrange(3)
    if kind == 0:
        return f'{subject} {rng.choice(INTRANSITIVE)}.'
    if kind == 1:
        return f'{subject} {rng.choice(VERBS)} a {rng.choice(OBJECTS)}.'
    return f'{subject} {rng.choice(VERBS)} a {rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)}.'

def needle_min_len(n_digits):
    """Length of a document with no filler at all: needle, space, question, answer, '\\n'."""
    return len(NEEDLE.format('0' * n_digits)) + 1 + len(QUESTION.format('0' * n_digits))

def make_needle_docs(n, seed, doc_len=DOC_LEN, n_digits=N_DIGITS, full=False, lengths='uniform'):
    """
    n documents as (text, answer). text ends with the answer and '\\n'; len(text) <= doc_len.
    Lengths vary up to doc_len, uniformly or log-uniformly (as many documents between 64 and 128
    characters as between 512 and 1024: short ones, where retrieval is learned fast, stay common
    when doc_len is long), or with full=True fill doc_len as far as the sentences allow (to within
    one short sentence), which is what a length sweep wants.
    """
    min_len = needle_min_len(n_digits)
    if doc_len < min_len:
        raise DataError(f'doc_len={doc_len} is too short: a needle document with {n_digits} digits '
                        f'needs at least {min_len} characters')
    rng = random.Random(seed)
    docs = []
    for _ in tqdm(range(n), desc=f'needle docs (seed {seed})', disable=n < 5000):
        answer = str(rng.randrange(10 ** n_digits)).zfill(n_digits)
        if full:
            length = doc_len
        elif lengths == 'loguniform':
            length = round(math.exp(rng.uniform(math.log(min_len), math.log(doc_len))))
        else:
            length = rng.randint(min_len, doc_len)
        room = length - min_len
        sentences = []
        while room >= SHORTEST_SENTENCE + 1: # +1 for the space that joins it
            s = filler_sentence(rng)
            if len(s) + 1 <= room: # too long ones are redrawn; the shortest always fits, so this ends
                sentences.append(s)
                room -= len(s) + 1
        sentences.insert(rng.randint(0, len(sentences)), NEEDLE.format(answer))
        docs.append((' '.join(sentences) + ' ' + QUESTION.format(answer), answer))
    return docs

def needle_eval_set(n, seed, doc_len=DOC_LEN, n_digits=N_DIGITS):
    """n held-out {'prompt', 'answer'} dicts of full-length documents; prompt ends with '? '."""
    return [{'prompt': text[:-(n_digits + 1)], 'answer': answer}
            for text, answer in make_needle_docs(n, seed, doc_len, n_digits, full=True)]

def prepare_needle(out_dir='data', name='needle', doc_len=DOC_LEN, n_digits=N_DIGITS,
                   n_train_docs=N_TRAIN_DOCS, n_val_docs=N_VAL_DOCS, n_eval=N_EVAL, seed=SEED, lengths='uniform'):
    data_dir = os.path.join(out_dir, name)
    os.makedirs(data_dir, exist_ok=True)
    meta = {**char_meta(NEEDLE_CHARS), 'dataset': 'needle', 'doc_len': doc_len, 'n_digits': n_digits,
            'lengths': lengths}
    encode, _ = get_tokenizer(meta)
    # different seeds, so validation and eval are fresh draws rather than copies of training documents
    # (very short documents, with little or no filler, can still coincide by chance)
    for split, n, split_seed in [('train', n_train_docs, seed), ('val', n_val_docs, seed + 1)]:
        texts = [text for text, _ in make_needle_docs(n, split_seed, doc_len, n_digits, lengths=lengths)]
        starts = np.cumsum([0] + [len(t) for t in texts[:-1]]) # one char is one token
        write_split(data_dir, split, encode(''.join(texts)))
        starts.astype(np.uint32).tofile(os.path.join(data_dir, f'{split}_starts.bin'))
        print(f'{split}: {n:,} docs, {sum(map(len, texts)):,} tokens')
    with open(os.path.join(data_dir, 'eval.json'), 'w') as f:
        json.dump(needle_eval_set(n_eval, seed + 2, doc_len, n_digits), f, indent=1)
    write_meta(data_dir, meta)
    print(f'wrote {data_dir} (vocab {meta["vocab_size"]}, doc_len {doc_len}, {lengths} lengths, {n_eval} eval prompts)')
    return data_dir

# -----------------------------------------------------------------------------
# the copying corpus: short stories about made-up people, places and things whose names recur,
# so that a language model gains by copying from earlier in the document, as it does in web text
# where names and rare words come back. Generated offline; the same bytes for the same seed.
# Each story also states facts ("The boat of Vel is Drouth.") and states them again later, word for
# word: a phrase met before, then what followed it, the very pattern of the paper's copy probe
# (dataset.py), whose key phrases and filler the corpus never writes (its values, five random
# capitals, only by chance). Names are Capitalized; half the facts' values are in capitals ("DROUTH"),
# and nothing else is.

ONSETS = ['', 'b', 'br', 'c', 'ch', 'd', 'dr', 'f', 'g', 'gr', 'h', 'j', 'k', 'kl', 'l', 'm', 'n', 'p', 'qu', 'r',
          's', 'sh', 't', 'th', 'tr', 'v', 'w', 'x', 'y', 'z']
VOWELS = ['a', 'e', 'i', 'o', 'u', 'ai', 'ou', 'ea']
CODAS = ['', '', 'n', 'r', 'l', 'sk', 'th', 'x', 'm']
ROLES = ['baker', 'sailor', 'farmer', 'weaver', 'doctor', 'singer', 'painter', 'miner', 'teacher', 'guard']
ACTS = ['fixed', 'found', 'sold', 'painted', 'hid', 'lost', 'carried', 'cleaned', 'bought', 'borrowed']
MOODS = ['happy', 'tired', 'quiet', 'angry', 'curious', 'proud', 'worried', 'calm']
ATTRIBUTES = ['boat', 'song', 'sign', 'horse', 'lucky stone', 'old name', 'best friend', 'door code']
COPY_CHARS = sorted(set(string.ascii_letters + " .,'\n"))


def made_up_word(rng, capital=True):
    word = ''.join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(1, 3))) + rng.choice(CODAS)
    return word.capitalize() if capital else word


def copy_story(rng, length):
    """One story of about `length` characters (a few sentences over), ending with a newline."""
    people = []
    for _ in range(rng.randint(2, 4)):
        people.append(next(w for w in iter(lambda: made_up_word(rng), None) if w not in people))
    place, thing = made_up_word(rng), made_up_word(rng, capital=False)
    facts = []
    for attribute in rng.sample(ATTRIBUTES, 2):
        value = made_up_word(rng)
        facts.append(f'The {attribute} of {rng.choice(people)} is {value.upper() if rng.random() < 0.5 else value}.')
    first = [f'{p} was a {rng.choice(ROLES)} from {place}.' for p in people] + [f'{people[0]} had a {thing}.'] + facts
    rng.shuffle(first)
    sentences, told = first, len(first)
    while sum(len(s) + 1 for s in sentences) < length or len(sentences) < told + len(people):
        a = people[(len(sentences) - told) % len(people)]  # each in turn: every name comes back
        b = rng.choice([p for p in people if p != a])
        sentences.append(rng.choice([
            f'{a} {rng.choice(ACTS)} the {thing} of {b}.', f'In {place}, {a} met {b}.',
            f'{a} was {rng.choice(MOODS)}, and {b} knew why.', f'Nobody in {place} had a {thing} like {a}.',
            f"{b} said that {a} {rng.choice(ACTS)} a {thing}.", f'{a} and {b} walked to {place}.',
            f"The {thing} of {a} was in {place}.", f'{a} asked {b} about the {thing}.',
            f'Then {a} went home to {place}.', f'{a} was {rng.choice(MOODS)}.']))
    for fact in facts:  # told again in the story's second half, word for word
        sentences.insert(rng.randint(len(sentences) // 2 + 1, len(sentences)), fact)
    return ' '.join(sentences) + '\n'


def prepare_copy(out_dir='data', name='copy', n_train_docs=40000, n_val_docs=1000, doc_len=DOC_LEN * 8, seed=SEED):
    """The copying corpus: stories of doc_len characters on average, train from seed, val from seed + 1."""
    data_dir = os.path.join(out_dir, name)
    os.makedirs(data_dir, exist_ok=True)
    meta = {**char_meta(COPY_CHARS), 'dataset': 'copy', 'probe': True}
    encode, _ = get_tokenizer(meta)
    for split, n, split_seed in [('train', n_train_docs, seed), ('val', n_val_docs, seed + 1)]:
        rng = random.Random(split_seed)
        text = ''.join(copy_story(rng, rng.randint(doc_len // 2, doc_len * 3 // 2)) for _ in range(n))
        write_split(data_dir, split, encode(text))
        print(f'{split}: {n:,} stories, {len(text):,} tokens')
    write_meta(data_dir, meta)
    print(f'wrote {data_dir} (vocab {meta["vocab_size"]})')
    return data_dir

# -----------------------------------------------------------------------------
# text files: shakespeare (downloaded once, checked by hash) or any local file

def sha256_file(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()

def download(url, path, sha256, timeout=10, local_cmd=None):
    """Fetch url to path unless path already holds the file with this sha256. Atomic: a failed
    or corrupt download leaves nothing behind, not even a partial file. local_cmd is the
    command the offline error suggests for preparing from a local copy instead."""
    if os.path.exists(path):
        if sha256_file(path) == sha256:
            return path
        print(f'{path} has the wrong sha256, downloading a fresh copy')
    folder = os.path.dirname(path) or '.'
    made, parent = [], folder  # the folders made here, innermost first: a failed download removes them
    while not os.path.isdir(parent):
        made.append(parent)
        parent = os.path.dirname(parent) or '.'
    os.makedirs(folder, exist_ok=True)
    # temp file in the same folder, so os.replace is a rename on one filesystem and cannot half-happen
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.part')
    try:
        with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(url, timeout=timeout) as r:
            size = int(r.headers.get('Content-Length') or 0) or None
            with tqdm(total=size, unit='B', unit_scale=True, desc='download') as bar:
                while chunk := r.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        actual = sha256_file(tmp)
        if actual != sha256:
            raise DataError(f'integrity check failed for {url}: expected sha256 {sha256}, got {actual}; '
                            'the bad file was not kept')
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError) as e: # URLError, timeouts and refused connections are all OSErrors
        local_cmd = local_cmd or f'python prepare_data.py --input=path/to/input.txt --name={os.path.basename(folder)}'
        raise DataError(
            f'download of {url} failed ({e}); this machine may be offline. To use a local copy instead run:\n'
            f'  {local_cmd}\n'
            f'or place the file at {path} (sha256 {sha256}), which is then used without downloading.') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        for d in made:
            if not os.listdir(d):
                os.rmdir(d)
    return path

def encode_text(text, encode):
    # encode in ~1MB pieces cut after a newline, so big files get a progress bar
    pieces, i = [], 0
    while i < len(text):
        j = text.find('\n', i + (1 << 20))
        j = len(text) if j == -1 else j + 1
        pieces.append(text[i:j])
        i = j
    return [t for p in tqdm(pieces, desc='encode', disable=len(pieces) < 2) for t in encode(p)]

def prepare_text(text, name, tokenizer='char', out_dir='data'):
    """Split text 90/10 into train/val, encode with the char or gpt2 tokenizer, write data/<name>/."""
    if not text:
        raise DataError(f'the text for {name!r} is empty')
    if tokenizer == 'char':
        meta = char_meta(text)
        if meta['vocab_size'] > 1 << 16:
            raise DataError(f'{meta["vocab_size"]} distinct characters do not fit uint16 token ids')
    elif tokenizer == 'gpt2':
        meta = {'tokenizer': 'gpt2', 'vocab_size': 50257}
    else:
        raise DataError(f"unknown tokenizer {tokenizer!r}, expected 'char' or 'gpt2'")
    meta['dataset'] = name
    encode, _ = get_tokenizer(meta)
    data_dir = os.path.join(out_dir, name)
    os.makedirs(data_dir, exist_ok=True)
    n = int(0.9 * len(text))
    for split, part in [('train', text[:n]), ('val', text[n:])]:
        ids = encode_text(part, encode)
        write_split(data_dir, split, ids)
        print(f'{split}: {len(ids):,} tokens')
    write_meta(data_dir, meta)
    print(f'wrote {data_dir} ({tokenizer} tokenizer, vocab {meta["vocab_size"]})')
    return data_dir

def read_text(path):
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f'cannot read {path}: {e}') from None

def prepare_shakespeare(tokenizer='char', out_dir='data', url=SHAKESPEARE_URL):
    name = 'shakespeare_char' if tokenizer == 'char' else 'shakespeare'
    local_cmd = f'python prepare_data.py --input=path/to/input.txt --tokenizer={tokenizer} --name={name}'
    path = download(url, os.path.join(out_dir, name, 'input.txt'), SHAKESPEARE_SHA256, local_cmd=local_cmd)
    return prepare_text(read_text(path), name, tokenizer, out_dir)

DATASETS = ['needle', 'copy', 'shakespeare_char', 'shakespeare']

def prepare(dataset='needle', out_dir='data', **kwargs):
    """Prepare a named dataset; kwargs go to prepare_needle, prepare_copy or prepare_shakespeare. Returns data dir."""
    if dataset == 'needle':
        return prepare_needle(out_dir, **kwargs)
    if dataset == 'copy':
        return prepare_copy(out_dir, **kwargs)
    if dataset in ('shakespeare_char', 'shakespeare'):
        return prepare_shakespeare('char' if dataset == 'shakespeare_char' else 'gpt2', out_dir, **kwargs)
    raise DataError(f'unknown dataset {dataset!r}, expected one of {DATASETS} (or --input=file.txt)')

# -----------------------------------------------------------------------------

@dataclass
class PrepareConfig:
    dataset: str = opt('needle', f"one of {', '.join(DATASETS)}")
    input: str = opt('', 'a local text file to use instead of --dataset')
    tokenizer: str = opt('char', "for --input: 'char' or 'gpt2'")
    name: str = opt('', 'the folder under data_dir (default: the dataset, or the --input file stem)')
    data_dir: str = opt('data', 'where dataset folders go (train.py reads data/)')
    url: str = opt(SHAKESPEARE_URL, 'tiny Shakespeare download url (a mirror)')
    doc_len: int = opt(DOC_LEN, 'needle: max characters per document, question and answer included')
    n_digits: int = opt(N_DIGITS, 'needle: digits of the secret number')
    doc_lengths: str = opt('uniform', "needle: training and val document lengths, "
                                      "'uniform' or 'loguniform' up to doc_len")
    n_train_docs: int = opt(N_TRAIN_DOCS, 'needle: training documents')
    n_val_docs: int = opt(N_VAL_DOCS, 'needle: validation documents')
    n_eval: int = opt(N_EVAL, 'needle: held-out prompts in eval.json')
    seed: int = opt(SEED, 'needle: train documents use seed, val seed+1, eval prompts seed+2')

    def __post_init__(self):
        check_values(self, positive=('n_digits', 'n_train_docs', 'n_val_docs', 'n_eval'),
                     choices=dict(dataset=DATASETS, tokenizer=('char', 'gpt2'), doc_lengths=('uniform', 'loguniform')))
        if self.doc_len < needle_min_len(self.n_digits):
            raise ValueError(f'--doc_len={self.doc_len} is too short: a needle document with {self.n_digits} '
                             f'digits needs at least {needle_min_len(self.n_digits)} characters')


def main(argv=None):
    args = parse_flags(PrepareConfig, sys.argv[1:] if argv is None else argv, __doc__)
    try:
        if args.input:
            name = args.name or os.path.splitext(os.path.basename(args.input))[0]
            prepare_text(read_text(args.input), name, args.tokenizer, args.data_dir)
        elif args.dataset == 'needle':
            prepare_needle(args.data_dir, args.name or 'needle', args.doc_len, args.n_digits,
                           args.n_train_docs, args.n_val_docs, args.n_eval, args.seed, args.doc_lengths)
        elif args.dataset == 'copy':
            prepare_copy(args.data_dir, args.name or 'copy', seed=args.seed)
        elif args.name:
            raise DataError('--name only applies to --input and the needle and copy datasets')
        else:
            prepare(args.dataset, args.data_dir, url=args.url)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a download in flight leaves no partial file (see download)
        sys.exit('interrupted')

if __name__ == '__main__':
    main()
