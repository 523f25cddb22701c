"""The names data set: where it comes from, how it becomes tensors, how batches are drawn.

As in makemore: every name becomes one example per character (its context of `block_size`
previous characters, padded with '.'), and the *names* are split 80/10/10 after a seeded
shuffle. The vocabulary comes from the data: '.' (start and end token, index 0) plus the
sorted set of characters in the file, so the lecture's names.txt gives '.' + a-z (indices
0..26) and a file of names with accents, digits or another script (UTF-8) gives its own.

Preparing scales to files of hundreds of MB: the names stay one text (no Python string per
name), the examples are made with array operations, column by column, and stored in the
smallest integer type that holds the vocabulary (uint8 up to 256 symbols): (block_size + 1)
bytes per character of the file, not 8x that in int64. Training batches are converted to
int64 (what nn.Embedding and cross_entropy take) only when drawn. A text of one byte per
character (ASCII, or Latin-1 once decoded) becomes indices through bytes.translate; a wider
one through numpy, over its code points.
"""

import functools
import hashlib
import logging
import math
import os
import random
import unicodedata
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import lightning as L
import numpy as np
import torch
from tqdm import tqdm

from actgrad.checks import ConfigError

log = logging.getLogger(__name__)

NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
VOCAB = "." + ALPHABET  # the lecture's vocabulary (names.txt's); a data set's own is NamesData.vocab
END = "."  # index 0 of every vocabulary: the start and end token
UTF8_BOM = b"\xef\xbb\xbf"
LINE_ENDS = "\r\n"  # what ends a name as '.' does (any other line separator is rewritten to \n when read)
CENSUS = "census-1990-first-names"
LETTERS = ALPHABET.encode()
# Peak memory of preparing, per byte of the file, besides the examples ((block_size + 1) bytes a
# character): the text and its codes, where each name starts and its size (16 bytes a name), and
# the shuffle's arrays (~30 bytes a name at their peak). scripts/bench_data.py measures 5.0 on
# 200 MB of census names (~7 bytes a name) at block_size 3 and 8; files of shorter names take more.
# A file that is not ASCII is also held decoded (1, 2 or 4 bytes a character, by its widest one).
PREPARE_BYTES_PER_BYTE = 8
CHUNK = 1 << 22  # characters a time, where numpy works over code points (4 bytes each)


class DataError(ConfigError):
    """A data file or setting we cannot use; the message says which and why."""


@dataclass
class Words:
    text: bytes | str  # the names, one a line: ASCII stays bytes; anything else is the decoded str, read once
    name: str  # where they came from, recorded in the run's hyperparameters
    sha256: str
    count: int
    vocab: str = VOCAB  # '.' and the sorted characters of the names: index i is vocab[i]

    @property
    def words(self) -> list[str]:
        text = self.text.decode("ascii") if isinstance(self.text, bytes) else self.text
        return [w for w in text.splitlines() if w]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # in chunks: a big file is not held twice
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def index_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer type (of those torch has too) that holds every index of the vocabulary."""
    for dtype in (np.uint8, np.int16, np.int32, np.int64):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"a vocabulary of {vocab_size} symbols is too big")


def available_memory() -> int | None:
    """Bytes of memory the kernel can still give (MemAvailable); None where there is no /proc/meminfo."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_needed(file_size: int, block_size: int, decoded_bytes: int = 0, index_bytes: int = 1) -> int:
    """Estimated peak bytes of preparing a names file of file_size bytes (the interpreter and torch aside).

    decoded_bytes: bytes a character of the decoded text, if the file is not ASCII (0 if it is);
    index_bytes: bytes an index takes (1 up to 256 symbols)."""
    examples = (block_size + 1) * index_bytes  # per character, all splits together
    return file_size * (PREPARE_BYTES_PER_BYTE + decoded_bytes + examples)


def check_memory(path: Path, block_size: int, decoded_bytes: int = 0, index_bytes: int = 1) -> None:
    """Refuse a file too big for this machine before preparing it, rather than die of a MemoryError midway."""
    available = available_memory()
    if available is None:
        return
    size = path.stat().st_size
    needed = memory_needed(size, block_size, decoded_bytes, index_bytes)
    if needed > available:
        raise DataError(
            f"data.path={path}: a file of {size / 1e6:.1f} MB needs about {needed / 1e9:.1f} GB of memory to "
            f"prepare (block_size={block_size}) but {available / 1e9:.1f} GB is available; "
            f"give a smaller file or use a machine with more memory"
        )


def read_names(path: Path, block_size: int = 3) -> tuple[bytes | str, int, str]:
    """(text, count, vocab): the names of a file, one a line (UTF-8), and their vocabulary.

    Lines are stripped and blank ones dropped; a file we cannot use (binary, not UTF-8, fewer
    than 10 names, a name with '.' or a control character) is a one-line DataError, not a silent
    fix. block_size is the context the names will be prepared for: it sizes the memory check.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data.path={path}: is a directory, not a file (give a text file with one name per line)")
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file (give a text file with one name per line)")
    check_memory(path, block_size)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"data.path={path}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
    if raw.startswith(UTF8_BOM):  # what some editors put first: not part of the first name
        raw = raw[len(UTF8_BOM):]
    seen = byte_set(raw)
    if seen and seen[-1] >= 0x80:  # not ASCII: decoded once, and held as a str
        wide = 4 if seen[-1] >= 0xF0 else 2 if any(0xC4 <= b < 0xF0 for b in seen) else 1
        check_memory(path, block_size, decoded_bytes=wide, index_bytes=1 if wide == 1 else 2)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"data.path={path}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
        chars = utf8_characters(raw, seen)
        del raw
    else:
        text, chars = raw, seen.decode("ascii")
    if "\x00" in chars:
        raise DataError(f"data.path={path}: is a binary file, not one name per line")
    if needs_cleaning(text, chars):
        text = cleaned(text)
        chars = characters(text)
    check_characters(path, text, chars)
    count = count_names(text)
    if count < 10:
        raise DataError(f"data.path={path}: has {count} names; at least 10 are needed for an 80/10/10 split")
    return text, count, vocab_of(chars)


def byte_set(data: bytes) -> bytes:
    """The distinct bytes of data, sorted: those of a 64 kB piece, then the rest with those deleted,
    and so on; bytes.translate's passes, two or three on a names file, and no array of the file."""
    found = set()
    while data:
        found |= set(data[:1 << 16])
        data = data.translate(None, bytes(found))
    return bytes(sorted(found))


def characters(text: bytes | str) -> str:
    """The distinct characters of a text, sorted by code point."""
    if isinstance(text, bytes):
        return byte_set(text).decode("ascii")
    return utf8_characters(text.encode("utf-8"))


def utf8_characters(raw: bytes, seen: bytes | None = None) -> str:
    """The distinct characters of UTF-8 text, sorted by code point; seen: byte_set(raw), if known."""
    seen = byte_set(raw) if seen is None else seen
    found = bytes(b for b in seen if b < 0x80).decode("ascii")
    if not seen or seen[-1] < 0x80:
        return found
    # deleting the ASCII bytes of UTF-8 leaves whole characters: the non-ASCII ones
    rest = raw.translate(None, bytes(range(0x80))).decode("utf-8")
    one_byte = single_bytes(rest)
    if one_byte is not None:  # Latin-1: a byte each, as ASCII
        return found + byte_set(one_byte).decode("latin-1")
    present = np.zeros(0x110000, bool)
    for start in range(0, len(rest), CHUNK):
        present[np.frombuffer(rest[start:start + CHUNK].encode("utf-32-le"), "<u4")] = True
    return found + "".join(map(chr, np.flatnonzero(present).tolist()))


def single_bytes(text: str) -> bytes | None:
    """The text a byte a character (Latin-1), or None if it has a wider one."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return None


def needs_cleaning(text: bytes | str, chars: str) -> bool:
    """Whether the names' lines need stripping: blank lines and \\r (\\r\\n line ends) are read as they
    are, and spaces within a name are part of it; any other whitespace, or spaces at a line's ends, are not."""
    if any(c.isspace() and c not in " \r\n" for c in chars):
        return True
    if isinstance(text, str) and ("\r" in chars or "\n\n" in text or text.startswith("\n")):
        return True  # a str is kept one name a line
    if " " not in chars:
        return False
    space, ends = (b" ", (b"\n", b"\r")) if isinstance(text, bytes) else (" ", ("\n", "\r"))
    return (text.startswith(space) or text.endswith(space)
            or any(space + end in text or end + space in text for end in ends))


def cleaned(text: bytes | str) -> bytes | str:
    """The stripped lines of a text, blank ones dropped, one a line (a Python string a name: ~10x the file)."""
    decoded = text.decode("ascii") if isinstance(text, bytes) else text
    joined = "\n".join(w for w in map(str.strip, decoded.splitlines()) if w)
    return joined.encode("ascii") if isinstance(text, bytes) else joined


def check_characters(path: Path, text: bytes | str, chars: str) -> None:
    """One line naming the first name with '.' (the end token) or a control character."""
    if END in chars:
        raise DataError(f"data.path={path}: name {name_at(text, END)!r} has '.', the start and end token of "
                        f"every name; remove or replace it")
    for c in chars:
        if c not in LINE_ENDS and not c.isspace() and unicodedata.category(c) == "Cc":
            raise DataError(f"data.path={path}: name {name_at(text, c)!r} has the control character {c!r}; "
                            f"give plain text, one name per line")


def name_at(text: bytes | str, char: str) -> str:
    """The (first) name of a text in which char occurs."""
    if isinstance(text, bytes):
        text = text.decode("ascii")
    at = text.index(char)
    start = max(text.rfind("\n", 0, at), text.rfind("\r", 0, at)) + 1
    ends = [i for i in (text.find("\n", at), text.find("\r", at)) if i >= 0]
    return text[start:min(ends, default=len(text))]


def vocab_of(chars: str) -> str:
    """'.' and the characters of the names, sorted: line ends are not symbols."""
    return END + "".join(c for c in chars if c not in LINE_ENDS)


def count_names(text: bytes | str) -> int:
    """The names (non-empty lines) of a text."""
    nl, cr = ("\n", "\r") if isinstance(text, str) else (b"\n", b"\r")
    if cr not in text and nl + nl not in text and not text.startswith(nl):  # one name a line: count lines
        return text.count(nl) + (not text.endswith(nl)) if text else 0
    codes = np.frombuffer(text, np.uint8)  # only bytes get here (a str is kept one name a line)
    in_name = (codes != ord("\n")) & (codes != ord("\r"))
    return int(in_name[:1].sum() + np.count_nonzero(in_name[1:] & ~in_name[:-1]))


def read_words(path: Path, block_size: int = 3) -> list[str]:
    """The names of a file as a list (read_names checks them)."""
    text = read_names(path, block_size)[0]
    return [w for w in (text.decode("ascii") if isinstance(text, bytes) else text).splitlines() if w]


def download(url: str, dest: Path, sha256: str, timeout: float = 10.0) -> None:
    """Fetch url to dest with a progress bar; dest appears only once its digest is right."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
        got = sha256_of(partial)
        if got != sha256:
            raise DataError(f"download of {url} has sha256 {got}, expected {sha256}")
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


def census_names() -> list[str]:
    """Offline fallback: the 1990 US Census first names shipped by the PyPI package `names`."""
    folder = resources.files("names")
    words = set()
    for file in ("dist.male.first", "dist.female.first"):
        for line in folder.joinpath(file).read_text().splitlines():
            if line.strip():
                words.add(line.split()[0].lower())
    return sorted(w for w in words if set(w) <= set(ALPHABET))


def load_words(path: str | None, cache_dir: str, url: str = NAMES_URL, block_size: int = 3) -> Words:
    """data.path if set; else a cached names.txt; else a download; else the census fallback."""
    if path:
        path = Path(path).expanduser()
        return words_of_file(path, str(path), block_size)
    cached = Path(cache_dir).expanduser() / "names.txt"
    if not cached.is_file():
        try:
            download(url, cached, NAMES_SHA256)
        except (OSError, DataError) as e:
            log.warning(
                "names.txt unavailable (%s); using %s instead (1990 US Census first names, from the `names` "
                "package). For the lecture's data set put names.txt at %s or set data.path.",
                e, CENSUS, cached,
            )
            words = census_names()
            text = "\n".join(words).encode()
            return Words(text, CENSUS, hashlib.sha256(text).hexdigest(), len(words), vocab_of(characters(text)))
    return words_of_file(cached, "names.txt", block_size)


def words_of_file(path: Path, name: str, block_size: int) -> Words:
    text, count, vocab = read_names(path, block_size)
    return Words(text, name, sha256_of(path), count, vocab)


def build_examples(words: list[str], block_size: int, vocab: str = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (context, next character) pair of every word, as in makemore, in a compact integer type.

    vocab: the symbols, index order ('.' first); the lecture's '.' + a-z by default."""
    y = encode(words, vocab)
    return torch.from_numpy(context_windows(y, block_size)), torch.from_numpy(y)


def encode(words: list[str], vocab: str = VOCAB) -> np.ndarray:
    """The words one after another, each ended by '.', as vocabulary indices: the targets of their examples."""
    text = "".join(w + "\n" for w in words)
    unknown = set(text) - set(vocab[1:]) - {"\n"}
    if unknown:
        raise ValueError(f"a word has {''.join(sorted(unknown))!r}, outside the vocabulary {vocab!r}")
    return np.require(indices(text, vocab), requirements="W")  # a tensor of it may be written to


@functools.lru_cache(maxsize=8)
def byte_table(vocab: str) -> bytes:
    """byte -> index, for bytes.translate of a text of a byte a character (ASCII, Latin-1); line ends -> 0."""
    table = bytearray(256)
    for i, c in enumerate(vocab[1:], 1):
        table[ord(c)] = i
    return bytes(table)


def indices(text: bytes | str, vocab: str) -> np.ndarray:
    """A text as indices of vocab (each of its characters must be there), line ends as 0 ('.').

    A byte a character (ASCII bytes, or a str whose vocabulary is Latin-1): bytes.translate. Wider:
    numpy, a chunk of code points at a time, through a table from code point to index."""
    dtype = index_dtype(len(vocab))
    if isinstance(text, str):
        top = max(vocab)
        if top <= "\xff":
            text = text.encode("latin-1")
        else:
            table = np.zeros(ord(top) + 1, dtype)  # line ends (and nothing else absent from vocab) -> 0
            table[[ord(c) for c in vocab[1:]]] = np.arange(1, len(vocab))
            unit, width = ("utf-16-le", "<u2") if top < "\U00010000" else ("utf-32-le", "<u4")
            out = np.empty(len(text), dtype)
            for start in range(0, len(text), CHUNK):
                points = np.frombuffer(text[start:start + CHUNK].encode(unit), width)
                np.take(table, points, out=out[start:start + len(points)])
            return out
    return np.frombuffer(text.translate(byte_table(vocab)), np.uint8).astype(dtype, copy=False)


def context_windows(y: np.ndarray, block_size: int) -> np.ndarray:
    """x[p] = the block_size indices before position p within its own word, padded with 0 ('.').

    Column by column, not character by character: the column d characters back is the one
    d - 1 back shifted down a row, and 0 where the previous character ended a word ('.' is 0,
    so each word starts from a context of '.' again).
    """
    x = np.zeros((len(y), block_size), y.dtype)
    within_word = y[:-1] != 0
    previous = y  # 0 characters back: the targets themselves
    for column in reversed(range(block_size)):
        np.multiply(previous[:-1], within_word, out=x[1:, column])
        previous = x[:, column]
    return x


def split_words(words: list[str], seed: int) -> dict[str, list[str]]:
    """80/10/10 split of the names after random.seed(seed); shuffle, exactly as the lecture."""
    words = list(words)
    random.seed(seed)
    random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}


def prepare_splits(text: bytes | str, seed: int, block_size: int,
                   vocab: str = VOCAB) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """build_examples of each split of split_words(names, seed), from the names' text (one a line).

    The same examples, made from arrays: no Python string per name (~60 bytes each), and the
    shuffle's order computed with array operations (lecture_order).
    """
    codes, starts, sizes = name_codes(text, vocab)
    order = lecture_order(len(starts), seed)
    n1, n2 = int(0.8 * len(order)), int(0.9 * len(order))
    splits = {}
    for split, part in ("train", order[:n1]), ("val", order[n1:n2]), ("test", order[n2:]):
        y = gather_names(codes, starts, sizes, part)
        splits[split] = torch.from_numpy(context_windows(y, block_size)), torch.from_numpy(y)
    return splits


def name_codes(text: bytes | str, vocab: str = VOCAB) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, starts, sizes): the text as vocabulary indices, line ends as 0 (the end token '.'),
    where each name starts in codes, and its size with the 0 that ends it."""
    if text and text[-1] not in (b"\r\n" if isinstance(text, bytes) else LINE_ENDS):
        text += b"\n" if isinstance(text, bytes) else "\n"  # the last name too is followed by a 0
    codes = indices(text, vocab)
    ends = np.flatnonzero(codes == 0)  # the 0 after each name, and those of empty lines and of \r\n's \n
    starts = np.zeros_like(ends)
    np.add(ends[:-1], 1, out=starts[1:])  # a name starts just after the previous 0
    sizes = ends  # in place: these arrays are 8 bytes a name
    sizes -= starts
    sizes += 1
    if not (sizes > 1).all():  # drop the empty lines
        names = sizes > 1
        starts, sizes = starts[names], sizes[names]
    return codes, starts, sizes


def gather_names(codes: np.ndarray, starts: np.ndarray, sizes: np.ndarray, order: np.ndarray,
                 chunk: int = 1 << 16) -> np.ndarray:
    """The codes of the names order[0], order[1], ..., one after another, each with its ending 0."""
    out = np.empty(int(sizes[order].sum()), codes.dtype)
    at = 0
    for i in range(0, len(order), chunk):  # a chunk of names at a time: the gather index is 8 bytes a character
        names = order[i:i + chunk]
        first, size = starts[names], sizes[names]
        total = int(size.sum())
        # each output position comes from its name's start plus its place within the name
        source = np.repeat(first - (np.cumsum(size) - size), size) + np.arange(total)
        out[at:at + total] = codes[source]
        at += total
    return out


def lecture_order(n: int, seed: int) -> np.ndarray:
    """The order split_words puts n names in (random.seed(seed); random.shuffle), as an array of indices.

    Computed with array operations from the same random numbers (shuffle_order): random.shuffle
    takes ~1 s per million names. Leaves the global random state where split_words leaves it.
    """
    if n >= 2**32 or not shuffle_order_is_exact():  # a Python whose shuffle draws differently: the lecture's loop
        order = list(range(n))
        random.seed(seed)
        random.shuffle(order)
        return np.array(order, dtype=np.int64)
    order, draws = shuffle_order(n, random.Random(seed))
    random.seed(seed)
    skip_draws(random, draws)
    return order


def shuffle_order(n: int, rng: random.Random) -> tuple[np.ndarray, int]:
    """(order, draws): rng.shuffle(x) of n items puts x[order[p]] at position p; it takes `draws` 32-bit numbers."""
    swaps, draws = shuffle_swaps(n, rng)
    return apply_swaps(swaps), draws


class RandomWords:
    """The 32-bit numbers of a random.Random, in the order its getrandbits(k <= 32) calls use them.

    getrandbits(32 * m) is m of them at once, the first in the lowest bits.
    """

    def __init__(self, rng: random.Random, block: int = 1 << 20):
        self.rng, self.block = rng, block
        self.buffer, self.position, self.used = np.empty(0, np.uint32), 0, 0

    def peek(self, m: int) -> np.ndarray:
        if self.position + m > len(self.buffer):
            more = max(m, self.block)
            fresh = np.frombuffer(self.rng.getrandbits(32 * more).to_bytes(4 * more, "little"), "<u4")
            self.buffer, self.position = np.concatenate([self.buffer[self.position:], fresh]), 0
        return self.buffer[self.position:self.position + m]

    def advance(self, m: int) -> None:
        self.position += m
        self.used += m


def skip_draws(rng, draws: int, block: int = 1 << 20) -> None:
    """Advance rng (random.Random or the random module) by `draws` 32-bit numbers."""
    for start in range(0, draws, block):
        rng.getrandbits(32 * min(block, draws - start))


def shuffle_swaps(n: int, rng: random.Random) -> tuple[np.ndarray, int]:
    """swaps[i] = the j of random.shuffle's swap (i, j), for i = n-1 down to 1 (swaps[0] = 0); and the draws used.

    shuffle draws j = _randbelow(i + 1): the top k bits of a 32-bit number, k = (i + 1).bit_length(),
    drawn again while >= i + 1. Whether a number is kept depends on how many were kept before it
    (the bound drops by one each time), so numbers are taken a block at a time: those far below
    the bound are kept whatever came before, those above it are not, and the few in between
    are settled one by one in Python.
    """
    swaps = np.zeros(n, np.int64 if n > 2**31 else np.int32)
    words = RandomWords(rng)
    bound = n  # i + 1 of the next swap
    while bound >= 2:
        k = bound.bit_length()
        left = bound - (1 << (k - 1)) + 1  # swaps left whose bound has k bits
        size = max(64, 8 * math.isqrt(1 << k))  # ~64 unsure numbers a block
        r = (words.peek(size) >> (32 - k)).astype(np.int64)
        kept = r < bound - size
        kept_before = np.cumsum(kept) - kept
        extra = 0  # unsure numbers kept so far
        for t in np.flatnonzero((r >= bound - size) & (r < bound)).tolist():
            if r[t] < bound - kept_before[t] - extra:
                kept[t] = True
                extra += 1
        hits = np.flatnonzero(kept)[:left]
        swaps[bound - 1 - np.arange(len(hits))] = r[hits]
        bound -= len(hits)
        words.advance(int(hits[-1]) + 1 if len(hits) == left else size)
    return swaps, words.used


def apply_swaps(swaps: np.ndarray) -> np.ndarray:
    """order[p] = the item at position p after the swaps (i, swaps[i]) for i = n-1 down to 1, as arrays.

    Step i puts at position i, for good, what position swaps[i] held just before it: what the
    latest earlier step i' > i that targeted the same position brought there (or the original
    item). Step i' brought what position i' held just before step i', and so on: a chain of
    increasing steps, followed by pointer jumping (a few gathers) instead of one swap at a time.
    """
    n = len(swaps)
    # the steps of each target position, in increasing order (torch's stable sort is ~4x numpy's)
    targets, steps = (t.numpy() for t in torch.sort(torch.from_numpy(swaps), stable=True))
    steps = steps.astype(swaps.dtype)
    same = targets[1:] == targets[:-1]
    starts = np.ones(n, bool)
    starts[1:] = ~same
    first = np.full(n, -1, swaps.dtype)  # first[p]: the first step that targets position p
    first[targets[starts]] = steps[starts]
    del targets, starts
    later = np.full(n, -1, swaps.dtype)  # later[i]: the next step i' > i with the same target
    later[steps[:-1][same]] = steps[1:][same]
    del steps, same
    index = np.arange(n, dtype=swaps.dtype)
    # held[p]: the step that last brought something to position p before step p; p itself if none
    held = np.where(swaps == index, later, first)
    del first
    held = np.where(held >= 0, held, index)
    del index
    follow_to_ends(held)  # held[p]: the original item at position p just before step p
    return np.where(later >= 0, held[np.maximum(later, 0)], swaps)


def follow_to_ends(chain: np.ndarray) -> None:
    """chain[p] = the end of p -> chain[p] -> chain[chain[p]] -> ... (ends point to themselves), in place.

    Pointer jumping: every round halves the chains; only the entries not yet at an end are gathered again.
    """
    active = np.arange(len(chain))
    while len(active):
        now = chain[active]
        jumped = chain[now]
        moved = jumped != now
        chain[active] = jumped
        active = active[moved]


@functools.cache
def shuffle_order_is_exact() -> bool:
    """Does shuffle_order reproduce this Python's random.shuffle? Checked once, on 1000 items."""
    expected = list(range(1000))
    random.Random(0).shuffle(expected)
    return shuffle_order(1000, random.Random(0))[0].tolist() == expected


class RandomBatches:
    """Chunks of random minibatches, drawn from in-memory tensors, one chunk per Lightning batch.

    The minibatch of optimizer step s depends only on (seed, s), so a run resumed at any
    step, or chunked differently, sees exactly the batches of an uninterrupted run. A chunk
    is `steps_per_batch` steps, cut short at the next multiple of any of `cadences` (logging,
    validation, checkpoints), so those land on their exact steps whatever step a run resumed from.
    """

    def __init__(self, x, y, batch_size, steps_per_batch, max_steps, seed, first_step=lambda: 0, cadences=()):
        self.x, self.y = x, y
        self.batch_size, self.steps_per_batch, self.max_steps = batch_size, steps_per_batch, max_steps
        self.seed, self.first_step, self.cadences = seed, first_step, (steps_per_batch, *cadences)
        self.generator = torch.Generator()

    def indices(self, step: int) -> torch.Tensor:
        self.generator.manual_seed(self.seed * 1_000_003 + step)
        return torch.randint(0, len(self.x), (self.batch_size,), generator=self.generator)

    def chunks(self, start: int):
        """(first step, end step) of each chunk from `start` to max_steps."""
        while start < self.max_steps:
            end = min(self.max_steps, *((start // n + 1) * n for n in self.cadences))
            yield start, end
            start = end

    def __len__(self):
        return sum(1 for _ in self.chunks(self.first_step()))

    # Lightning asks loaders for their position to resume mid-epoch; ours is the global step
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        for first, end in self.chunks(self.first_step()):
            ix = torch.stack([self.indices(t) for t in range(first, end)])
            # stored compact; the model takes int64, so convert only the chunk drawn
            yield self.x[ix].long(), self.y[ix].long()


PREPARED = {}  # prepared_key -> (words, splits) of the last data set this process prepared


class NamesData(L.LightningDataModule):
    def __init__(self, path=None, cache_dir="~/.cache/actgrad", block_size=3, batch_size=32, split_seed=42,
                 url=NAMES_URL, train_examples=None):
        super().__init__()
        if block_size < 1:
            raise DataError(f"data.block_size={block_size}: must be a positive whole number")
        if batch_size < 1:
            raise DataError(f"data.batch_size={batch_size}: must be a positive whole number")
        if train_examples is not None and (not isinstance(train_examples, int) or train_examples < 1):
            raise DataError(f"data.train_examples={train_examples!r}: must be a positive whole number, or null for all")
        self.train_examples = train_examples  # the first n of the training split only (debug=overfit)
        self.path, self.cache_dir, self.url = path, cache_dir, url
        self.block_size, self.batch_size, self.split_seed = block_size, batch_size, split_seed
        # loop settings, set by the trainer side (actgrad.experiment) before fit
        self.steps_per_batch, self.max_steps, self.seed, self.cadences = 1, 1, 0, ()
        self.words = None

    def prepare(self) -> None:
        """Load the words and build all three splits once; idempotent. Data modules of one process
        with the same settings and file share them (the members of a stacked sweep: read-only)."""
        if self.words is not None:
            return
        key = self.prepared_key()
        if key not in PREPARED:
            words = load_words(self.path, self.cache_dir, self.url, self.block_size)
            PREPARED.clear()  # one data set at a time: a process trains one group
            PREPARED[key] = words, prepare_splits(words.text, self.split_seed, self.block_size, words.vocab)
        self.words, self.splits = PREPARED[key]

    def prepared_key(self) -> tuple:
        path = Path(self.path).expanduser() if self.path else Path(self.cache_dir).expanduser() / "names.txt"
        stat = path.stat() if path.is_file() else None  # a file changed since is read again
        return (str(path.absolute()), stat and (stat.st_size, stat.st_mtime_ns), self.url, self.block_size,
                self.split_seed)

    @property
    def vocab(self) -> str:
        """The symbols of the data, in index order: '.' (start and end token) and the sorted characters of the names."""
        self.prepare()
        return self.words.vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def setup(self, stage=None):
        self.prepare()

    def describe(self) -> dict:
        """What identifies the data set in the run's hyperparameters."""
        self.prepare()
        return {"name": self.words.name, "words": self.words.count, "sha256": self.words.sha256,
                **{f"{k}_examples": len(v[1]) for k, v in self.splits.items()}}

    def train_dataloader(self):
        x, y = self.splits["train"]
        if self.train_examples:  # a few examples seen over and over: the loss must fall towards its floor
            x, y = x[: self.train_examples], y[: self.train_examples]
        return RandomBatches(x, y, self.batch_size, self.steps_per_batch, self.max_steps, self.seed,
                             first_step=lambda: self.trainer.global_step if self.trainer else 0, cadences=self.cadences)
    # no val or test loaders: the module evaluates whole splits itself, at exact steps (module.py)
