import hashlib
import random

import pytest
import torch

import actgrad.data
from actgrad.data import (DataError, NamesData, RandomBatches, build_examples, census_names, download,
                          index_dtype, load_words, read_words, split_words)


def test_lecture_split_counts(names_txt):
    data = NamesData(path=str(names_txt))
    data.prepare()
    counts = {split: len(y) for split, (x, y) in data.splits.items()}
    assert counts == {"train": 182625, "val": 22655, "test": 22866}
    assert data.vocab == "." + "abcdefghijklmnopqrstuvwxyz" and data.vocab_size == 27  # the lecture's indices
    assert data.describe()["sha256"] == "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"


def test_examples_are_padded_context_windows():
    x, y = build_examples(["emma", "ava"], block_size=3)
    # written out by hand: '.'=0, a=1, e=5, m=13, v=22
    assert x.tolist() == [[0, 0, 0], [0, 0, 5], [0, 5, 13], [5, 13, 13], [13, 13, 1],
                          [0, 0, 0], [0, 0, 1], [0, 1, 22], [1, 22, 1]]
    assert y.tolist() == [5, 13, 13, 1, 0, 1, 22, 1, 0]


def test_split_is_the_lectures_shuffle():
    import random

    words = [f"w{i}" for i in range(100)]
    expected = list(words)
    random.seed(42)
    random.shuffle(expected)
    splits = split_words(words, seed=42)
    assert splits["train"] + splits["val"] + splits["test"] == expected
    assert [len(s) for s in splits.values()] == [80, 10, 10]


@pytest.mark.parametrize(
    "content, complaint",
    [
        (b"", "has 0 names"),
        (b"\x00\x01\x02binary", "binary"),
        (b"anna\nst.john\n" + b"carl\n" * 20, "name 'st.john' has '.', the start and end token"),
        ("anna\nzo\u00eb\x07\n".encode() + b"carl\n" * 20, "name 'zo\u00eb\\x07' has the control character"),
        (b"anna\n", "has 1 names"),
        (b"\xff\xfe\xfa", "UTF-8"),
        ("anna\nbob\n".encode("utf-16") * 10, "UTF-8"),
    ],
)
def test_bad_data_files_are_named_in_one_line(tmp_path, content, complaint):
    path = tmp_path / "names.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_words(path)
    message = str(err.value)
    assert complaint in message and str(path) in message and "\n" not in message


def test_missing_path_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_words(str(tmp_path / "nope.txt"), cache_dir=str(tmp_path))


def test_download_checks_digest_and_caches(tmp_path, small_names):
    url = small_names.as_uri()
    good = hashlib.sha256(small_names.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "names.txt"
    with pytest.raises(DataError, match="sha256"):
        download(url, dest, sha256="0" * 64)
    assert not dest.exists() and not dest.with_suffix(".part").exists()
    download(url, dest, sha256=good)
    assert dest.read_bytes() == small_names.read_bytes()


def test_offline_fallback_is_the_census_names_with_a_warning(tmp_path, caplog):
    words = load_words(None, cache_dir=str(tmp_path), url=(tmp_path / "unreachable").as_uri())
    assert words.name == "census-1990-first-names"
    assert words.words == census_names() and len(words.words) > 4000
    assert all(w.isalpha() and w.islower() for w in words.words)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "census" in warnings[0].getMessage() and "data.path" in warnings[0].getMessage()


def test_cached_copy_is_used_before_any_download(tmp_path, small_names):
    (tmp_path / "names.txt").write_bytes(small_names.read_bytes())
    words = load_words(None, cache_dir=str(tmp_path), url="file:///nonexistent")
    assert words.name == "names.txt" and len(words.words) == 300


def test_batches_depend_only_on_seed_and_step():
    x = torch.arange(1000).view(-1, 1)
    y = torch.arange(1000)

    def steps(steps_per_batch, first_step=0):
        batches = RandomBatches(x, y, 8, steps_per_batch, max_steps=23, seed=3, first_step=lambda: first_step)
        return torch.cat([xb for xb, yb in batches]).squeeze(-1)

    whole = steps(1)
    assert whole.shape == (23, 8)
    assert torch.equal(steps(7), whole)  # other chunking, same batches
    assert torch.equal(steps(5, first_step=11), whole[11:])  # a resumed run sees the same batches
    other_seed = torch.cat([xb for xb, _ in RandomBatches(x, y, 8, 1, 23, seed=4)]).squeeze(-1)
    assert not torch.equal(other_seed, whole)


# --- preparing: vectorized, compact, checked against memory ------------------------------------


def per_character_examples(words, block_size, vocab=None):
    """The lecture's loop, written out independently: one (context, next index) per character and the end '.'."""
    xs, ys = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + ".":
            ix = 0 if ch == "." else ord(ch) - ord("a") + 1 if vocab is None else vocab.index(ch)
            xs.append(list(context))
            ys.append(ix)
            context = context[1:] + [ix]
    return xs, ys


def random_names(n, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 14))) for _ in range(n)]


@pytest.mark.parametrize("block_size", [1, 3, 8])
def test_vectorized_examples_equal_the_per_character_loop(tmp_path, block_size):
    words = random_names(300, seed=block_size)
    x, y = build_examples(words, block_size)
    assert (x.tolist(), y.tolist()) == per_character_examples(words, block_size)
    # the prepared splits too: names read from a file, split by the lecture's shuffle
    path = tmp_path / "names.txt"
    path.write_text("\n".join(words) + "\n")
    data = NamesData(path=str(path), block_size=block_size, split_seed=7)
    data.prepare()
    for split, names in split_words(words, seed=7).items():
        x, y = data.splits[split]
        assert (x.tolist(), y.tolist()) == per_character_examples(names, block_size), split


# the examples of names.txt at block_size 3, split_seed 42: what every run so far trained on, byte for byte
NAMES_TXT_EXAMPLES_SHA256 = "f14a558a29958fe91bb3f608e2a7862f68b91cbdadec5bf179e0d4ff62765502"


@pytest.mark.parametrize("data_file", ["names_txt", "small_names"])
def test_prepared_splits_are_the_lectures_shuffle(request, data_file):
    path = request.getfixturevalue(data_file)  # names_txt skips, saying why, where names.txt is absent
    words = path.read_text().splitlines()  # the lecture's reading, its split and its loop, written out again
    random.seed(42)
    random.shuffle(words)
    after_shuffle = random.random()
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    expected = {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}
    random.seed(0)  # prepare must reseed, as the lecture does
    data = NamesData(path=str(path), block_size=3, split_seed=42)
    data.prepare()
    assert random.random() == after_shuffle  # the global random state is where the lecture's shuffle leaves it
    digest = hashlib.sha256()
    for split, names in expected.items():
        x, y = data.splits[split]
        assert (x.tolist(), y.tolist()) == per_character_examples(names, 3), split
        digest.update(x.numpy().tobytes() + y.numpy().tobytes())
    if data_file == "names_txt":
        assert digest.hexdigest() == NAMES_TXT_EXAMPLES_SHA256


def test_examples_are_stored_in_uint8_and_drawn_as_int64(small_names):
    assert index_dtype(27) == "uint8" and index_dtype(300) == "int16" and index_dtype(70_000) == "int32"
    data = NamesData(path=str(small_names))
    data.prepare()
    assert {t.dtype for xy in data.splits.values() for t in xy} == {torch.uint8}
    xb, yb = next(iter(RandomBatches(*data.splits["train"], 8, 2, 4, seed=0)))
    assert xb.dtype == yb.dtype == torch.long and xb.shape == (2, 8, 3)


def test_prepared_examples_take_block_size_plus_one_bytes_per_character(tmp_path):
    rng = random.Random(0)
    names = census_names()
    path = tmp_path / "names.txt"
    path.write_text("\n".join(rng.choices(names, k=150_000)) + "\n")  # ~1 MB
    for block_size in (3, 8):
        data = NamesData(path=str(path), block_size=block_size)
        data.prepare()
        stored = sum(t.numel() * t.element_size() for xy in data.splits.values() for t in xy)
        assert stored / path.stat().st_size <= (block_size + 1) * 1 + 8


def test_a_file_too_big_for_memory_is_refused_in_one_line(small_names, monkeypatch):
    monkeypatch.setattr(actgrad.data, "available_memory", lambda: 1000)
    with pytest.raises(DataError) as err:
        NamesData(path=str(small_names)).prepare()
    message = str(err.value)
    assert f"data.path={small_names}" in message and "\n" not in message
    assert "needs about" in message and "available" in message and "MB" in message
    monkeypatch.setattr(actgrad.data, "available_memory", lambda: 10**12)
    NamesData(path=str(small_names)).prepare()  # the same file fits a bigger machine


def test_a_directory_as_data_path_says_so(tmp_path):
    with pytest.raises(DataError) as err:
        load_words(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert f"data.path={tmp_path}: is a directory" in str(err.value) and "no such file" not in str(err.value)


@pytest.mark.parametrize(
    "content",
    [b"anna\r\nbob\r\n" * 6, b"\n\nanna\n\n  bob \n\tcarl\n" * 5, b"anna\nbob\ncarl" * 5, b"anna\rbob\r" * 6],
)
def test_line_ends_blank_lines_and_spaces_read_as_before(tmp_path, content):
    path = tmp_path / "names.txt"
    path.write_bytes(content)
    text = content.decode()
    assert read_words(path) == [w.strip() for w in text.splitlines() if w.strip()]  # the old reading


# --- any word list: the vocabulary comes from the data -----------------------------------------


ACCENTED = ["zoë", "josé", "r2d2", "åsa", "mary ann", "o'brien", "jean-luc", "Zoë"]


@pytest.mark.parametrize("block_size", [1, 3])
def test_accented_digits_and_spaces_make_their_own_vocabulary(tmp_path, block_size):
    words = [ACCENTED[i % len(ACCENTED)] + "abcdefghij"[i % 10] * (i % 3) for i in range(300)]
    path = tmp_path / "names.txt"
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    data = NamesData(path=str(path), block_size=block_size, split_seed=5)
    data.prepare()
    assert data.vocab == "." + "".join(sorted(set("".join(words))))
    assert data.vocab[:6] == ". '-2Z" and data.vocab.endswith("åéë") and data.vocab_size == len(data.vocab)
    assert read_words(path) == words and data.words.words == words
    for split, names in split_words(words, seed=5).items():
        x, y = data.splits[split]
        assert x.dtype == y.dtype == torch.uint8
        assert (x.tolist(), y.tolist()) == per_character_examples(names, block_size, data.vocab), split
    x, y = build_examples(["zoë", "åsa"], block_size, data.vocab)  # a word list, in the data's vocabulary
    assert (x.tolist(), y.tolist()) == per_character_examples(["zoë", "åsa"], block_size, data.vocab)


@pytest.mark.parametrize("alphabet", ["αβγδεζηθικλμνξοπρστυφχψω", "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
                                      "李王张刘陈杨赵黄周吴", "🙂🚀ab"])
def test_other_scripts_are_prepared_through_code_points(tmp_path, alphabet):
    rng = random.Random(0)
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(400)]
    path = tmp_path / "names.txt"
    path.write_bytes(("\n".join(words) + "\n").encode())
    data = NamesData(path=str(path), split_seed=1)
    data.prepare()
    assert data.vocab == "." + "".join(sorted(set("".join(words))))
    for split, names in split_words(words, seed=1).items():
        x, y = data.splits[split]
        assert (x.tolist(), y.tolist()) == per_character_examples(names, 3, data.vocab), split


def test_a_vocabulary_over_256_symbols_is_stored_in_int16(tmp_path):
    symbols = [chr(0x4E00 + i) for i in range(300)]
    words = ["".join(symbols[(7 * i + j) % 300] for j in range(3)) for i in range(300)]
    path = tmp_path / "names.txt"
    path.write_text("\n".join(words), encoding="utf-8")
    data = NamesData(path=str(path))
    data.prepare()
    assert data.vocab_size == 301 and {t.dtype for xy in data.splits.values() for t in xy} == {torch.int16}
    x, y = data.splits["train"]
    names = split_words(words, seed=42)["train"]
    assert (x.tolist(), y.tolist()) == per_character_examples(names, 3, data.vocab)


def test_a_file_without_every_letter_has_only_its_own(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("abba\ncab\n" * 10)
    data = NamesData(path=str(path))
    assert data.vocab == ".abc" and data.vocab_size == 4  # prepared on first use
    assert data.splits["train"][1].max() == 3


@pytest.mark.parametrize(
    "content",
    ["  zoë \r\n\n josé\r\n".encode() * 6, "zoë\u2028josé\u00a0\n".encode() * 6, "zoë\tx\njosé\n".encode() * 6,
     b"r2d2  \n\n  c-3po\n" * 6, b"r2d2\r\nc-3po\r\n" * 6, ("\ufeff" + "zoë\njosé\n" * 6).encode()],
)
def test_non_letter_files_are_stripped_as_before(tmp_path, content):
    path = tmp_path / "names.txt"
    path.write_bytes(content)
    expected = [w.strip() for w in content.decode("utf-8-sig").splitlines() if w.strip()]  # a BOM is no character
    assert read_words(path) == expected
    data = NamesData(path=str(path))
    assert data.vocab == "." + "".join(sorted(set("".join(expected))))
    assert sum(len(y) for _, y in data.splits.values()) == sum(len(w) + 1 for w in expected)


def test_a_word_outside_the_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="'é', outside the vocabulary"):
        build_examples(["josé"], 3)


def test_a_run_on_the_offline_fallback_says_so_in_its_hyperparameters(tmp_path):
    """HPARAMS and hparams.yaml name the census names a run trained on, not just the `names` choice."""
    import subprocess
    import sys

    import yaml
    from conftest import ROOT, TINY

    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "train.py", *TINY, f"data.cache_dir={tmp_path / 'cache'}",
                           f"+data.url={(tmp_path / 'unreachable').as_uri()}", f"hydra.run.dir={run}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    recorded = yaml.safe_load((run / "hparams.yaml").read_text())
    assert recorded["data"] == "names (offline: census-1990-first-names)" and recorded["status"] == "completed"
