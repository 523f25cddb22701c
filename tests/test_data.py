import hashlib

import pytest
import torch

from actgrad.data import (DataError, NamesData, RandomBatches, build_examples, census_names, download, load_words,
                          read_words, split_words)


def test_lecture_split_counts(names_txt):
    data = NamesData(path=str(names_txt))
    data.prepare()
    counts = {split: len(y) for split, (x, y) in data.splits.items()}
    assert counts == {"train": 182625, "val": 22655, "test": 22866}
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
        (b"anna\nBob\n" + b"carl\n" * 20, "'B'"),
        (b"anna\n", "has 1 names"),
        (b"\xff\xfe\xfa", "UTF-8"),
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
