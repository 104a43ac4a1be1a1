"""Built-in data and the shard loader: determinism, exactly-once epochs, resume, bad data."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from shard_edits import corrupt_copy, read_shard, write_shard

from data_pipelines import DataError, digits, load_shard_set, synthetic
from data_pipelines.loader import LoaderState, ShardStream
from data_pipelines.shards import iter_tar_samples, write_split

TRANSFORM = T.Compose([T.RandomResizedCrop(16, scale=(0.5, 1.0)), T.ToTensor()])


def tokenize(captions):
    """A stand-in tokenizer: caption bytes as ids (enough to compare batches)."""
    out = torch.zeros(len(captions), 48, dtype=torch.long)
    for i, c in enumerate(captions):
        ids = list(c.encode())[:48]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def stream(shard_set, **kw):
    args = dict(
        global_batch_size=32,
        image_transform=TRANSFORM,
        tokenize=tokenize,
        num_workers=2,
        seed=5,
        shuffle_buffer=50,
        chunk_size=8,
    )
    args.update(kw)
    return ShardStream(shard_set, **args)


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


# --- built-in data ---------------------------------------------------------------------------
def test_synthetic_same_seed_same_bytes_and_manifest(tmp_path):
    spec = synthetic.SyntheticSpec(num_concepts=8, seed=11)
    for name in ("a", "b"):
        write_split(
            tmp_path / name,
            synthetic.generate(spec, 50),
            shard_size=16,
            label_names=synthetic.label_names(spec),
            progress=False,
        )
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    other = synthetic.SyntheticSpec(num_concepts=8, seed=12)
    write_split(tmp_path / "c", synthetic.generate(other, 50), shard_size=16, progress=False)
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["num_samples"] == 50 and manifest["num_shards"] == 4
    assert [s["num_samples"] for s in manifest["shards"]] == [16, 16, 16, 2]
    assert manifest["num_labels"] == 8 and len(manifest["label_names"]) == 8
    seen = [
        json.loads(s["json"])
        for p in sorted((tmp_path / "a").glob("*.tar"))
        for s in iter_tar_samples(str(p))
    ]
    assert [s["index"] for s in seen] == list(range(50))
    assert all(0 <= s["label"] < 8 for s in seen)


def test_synthetic_captions_state_the_concept():
    spec = synthetic.SyntheticSpec(num_concepts=6, seed=2)
    concepts = spec.concepts()
    for sample in synthetic.generate(spec, 30):
        for colour, shape, pos in concepts[sample.label]:
            for word in (colour, shape, pos):
                assert word in sample.caption, (sample.caption, concepts[sample.label])


def test_digits_are_real_and_split():
    train = list(digits.generate("train"))
    val = list(digits.generate("val"))
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert {s.label for s in train} == set(range(10))
    assert any(digits.DIGIT_NAMES[s.label] in s.caption or str(s.label) in s.caption for s in train)


# --- loader ---------------------------------------------------------------------------------
def test_two_ranks_two_workers_see_every_sample_once(shapes):
    ss = load_shard_set(shapes / "train")
    for epoch in (0, 1):
        counts = collections.Counter()
        batches = []
        for rank in range(2):
            it = stream(ss, rank=rank, world=2).epoch(epoch)
            n = 0
            for batch in it:
                assert batch["image"].shape == (16, 3, 16, 16)
                counts.update(batch["index"].tolist())
                n += 1
            batches.append(n)
        assert batches[0] == batches[1] == 512 // 32
        assert sorted(counts) == list(range(512)) and set(counts.values()) == {1}


def test_epochs_differ_and_ranks_agree(shapes):
    ss = load_shard_set(shapes / "train")
    first = [next(iter(stream(ss, rank=0, world=2).epoch(e)))["index"] for e in (0, 1)]
    assert not torch.equal(first[0], first[1])
    again = next(iter(stream(ss, rank=0, world=2).epoch(0)))["index"]
    assert torch.equal(first[0], again)


def test_uneven_shards_give_equal_batch_counts(tmp_path):
    spec = synthetic.SyntheticSpec(num_concepts=4, seed=1, image_size=16)
    ss = write_split(
        tmp_path, synthetic.generate(spec, 200), shard_size=60, progress=False
    )  # 60,60,60,20
    counts = []
    for rank in range(2):
        s = stream(ss, rank=rank, world=2, global_batch_size=16, num_workers=1)
        counts.append((s.steps_per_epoch(0), sum(1 for _ in s.epoch(0))))
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1] > 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(shapes, num_workers):
    ss = load_shard_set(shapes / "train")
    s = stream(ss, rank=1, world=2, num_workers=num_workers, chunk_size=5)
    full = list(s.epoch(1))
    it = s.epoch(1)
    head = []
    for batch in it:
        head.append(batch)
        if len(head) == 5:
            state = it.state()
            break
    state = LoaderState.from_dict(json.loads(json.dumps(state.to_dict())))  # as a checkpoint would
    rest = list(stream(ss, rank=1, world=2, num_workers=num_workers, chunk_size=5).epoch(1, state))
    assert len(head) + len(rest) == len(full)
    for a, b in zip(head + rest, full):
        for key in ("index", "label", "text", "image"):
            assert torch.equal(a[key], b[key]), key


def _corrupt_copy(shapes, tmp_path):
    """A copy of the train split whose shard 0 has a corrupt image, a zero-byte image and an
    empty caption."""
    return corrupt_copy(shapes / "train", tmp_path / "bad")


def test_bad_samples_are_skipped_and_counted(shapes, tmp_path):
    ss = load_shard_set(_corrupt_copy(shapes, tmp_path))
    bad = collections.Counter()
    seen = set()
    for rank in range(2):
        it = stream(ss, rank=rank, world=2, global_batch_size=16)
        it = it.epoch(0)
        for batch in it:
            seen.update(batch["index"].tolist())
        bad.update(it.bad)
    reasons = collections.Counter()
    for (_, why), n in bad.items():
        reasons[why] += n
    assert reasons == {"unreadable image": 1, "zero-byte image": 1, "empty caption": 1}
    assert all(shard.endswith("shard-000000.tar") for shard, _ in bad)
    assert not ({3, 5, 7} & seen)


def test_bad_sample_raises_under_on_error_raise(shapes, tmp_path):
    ss = load_shard_set(_corrupt_copy(shapes, tmp_path))
    with pytest.raises(Exception, match="shard-000000.tar"):
        for rank in range(2):
            for _ in stream(ss, rank=rank, world=2, on_error="raise", num_workers=0).epoch(0):
                pass


def test_too_few_shards_is_explained(tmp_path):
    spec = synthetic.SyntheticSpec(num_concepts=4, seed=1, image_size=16)
    ss = write_split(tmp_path, synthetic.generate(spec, 40), shard_size=40, progress=False)
    with pytest.raises(DataError, match="1 shard.* but 2 processes"):
        stream(ss, rank=0, world=2, global_batch_size=8)
    s = stream(ss, rank=0, world=1, global_batch_size=8, num_workers=4)  # fewer workers, a warning
    assert s.num_workers == 1


def test_missing_shard_is_named(shapes, tmp_path):
    dst = tmp_path / "missing"
    shutil.copytree(shapes / "train", dst)
    (dst / "shard-000002.tar").unlink()
    with pytest.raises(DataError, match="shard-000002.tar"):
        load_shard_set(dst)


def test_resampled_stream_has_fixed_epoch_length(shapes):
    ss = load_shard_set(shapes / "train")
    s = stream(ss, rank=0, world=2, resampled=True, samples_per_epoch=256)
    assert sum(1 for _ in s.epoch(0)) == 256 // 32


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_fast_forwards_without_decoding_and_counts_each_bad_sample_once(
    shapes, tmp_path, num_workers
):
    """Bad samples before the resume point are neither decoded again nor counted again."""
    ss = load_shard_set(_corrupt_copy(shapes, tmp_path))
    s = stream(ss, rank=0, world=1, num_workers=num_workers, chunk_size=5)
    full = s.epoch(0)
    n_full = sum(1 for _ in full)
    it = s.epoch(0)
    for k, _ in enumerate(it, 1):
        if k == n_full // 2:
            break
    head_bad = sum(it.bad.values())
    state = LoaderState.from_dict(json.loads(json.dumps(it.state().to_dict())))
    rest = stream(ss, rank=0, world=1, num_workers=num_workers, chunk_size=5).epoch(0, state)
    n_rest = sum(1 for _ in rest)
    assert n_full // 2 + n_rest == n_full
    # the resumed epoch carries the counts of the part before the checkpoint: its totals are
    # the whole epoch's, and each bad sample was counted once
    assert sum(rest.bad.values()) == sum(full.bad.values()) == 3
    assert rest.bad == full.bad
    assert head_bad > 0  # some bad samples lie before the resume point (seeded order)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_resume_mid_epoch_gives_the_same_batches(shapes, num_workers):
    """With shards drawn with replacement, repeats of a dataset index within an epoch are
    common and dropped; a resumed epoch must drop the same ones, so it needs the indices
    used before the checkpoint (they used to be forgotten: the batches after it differed)."""
    ss = load_shard_set(shapes / "train")

    def make():
        return stream(
            ss, num_workers=num_workers, chunk_size=5, resampled=True, samples_per_epoch=320
        )

    full = make().epoch(2)
    batches = list(full)
    assert sum(full.bad.values()) > 0  # repeats were dropped in this epoch
    for cut in (3, 6):
        it = make().epoch(2)
        head = [b for _, b in zip(range(cut), it)]
        state = LoaderState.from_dict(json.loads(json.dumps(it.state().to_dict())))
        assert len(state.seen) == cut * 32
        rest = make().epoch(2, state)
        again = head + list(rest)
        assert len(again) == len(batches)
        for a, b in zip(again, batches):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
        assert rest.bad == full.bad


def test_a_repeated_dataset_index_is_named_by_shard_and_key(shapes, tmp_path):
    """Two samples with one dataset index: the second is skipped as a bad sample named by its
    shard and key (it used to read "skipped sample 'index 5' in ?")."""
    dst = tmp_path / "dup"
    shutil.copytree(shapes / "train", dst)
    samples = read_shard(dst / "shard-000001.tar")
    samples[2]["json"] = json.dumps({**json.loads(samples[2]["json"]), "index": 5}).encode()
    write_shard(dst / "shard-000001.tar", samples)
    key = samples[2]["__key__"]
    ss = load_shard_set(dst)
    shards = {}
    for first in (True, False):  # whichever of the two comes second in the epoch is named
        it = stream(ss, num_workers=0, shuffle_buffer=0 if first else 50).epoch(0)
        for _ in it:
            pass
        dup = {k: n for k, n in it.bad.items() if k[1].startswith("duplicate dataset index 5")}
        assert sum(dup.values()) == 1, it.bad
        shards.update(dup)
    assert any(shard.endswith("shard-000001.tar") for shard, _ in shards)
    with pytest.raises(DataError, match=rf"sample '{key}' in .*shard-000001.tar: duplicate"):
        for _ in stream(ss, num_workers=0, shuffle_buffer=0, on_error="raise").epoch(0):
            pass


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"epoch": "1"},
        {"epoch": 0, "consumed": [-1]},
        {"epoch": 0, "consumed": [0], "next_worker": 3},
        {"epoch": 0, "seen": {"count": 2, "gaps_i64_zlib_b64": "not base64!"}},
        {"epoch": 0, "bad": [["shard", 3]]},
        {"epoch": 0, "colour": "red"},
    ],
)
def test_a_malformed_loader_state_is_a_value_error(bad):
    with pytest.raises(ValueError, match="loader state"):
        LoaderState.from_dict(bad)


def test_fn_testbed_preset_states_and_draws_each_images_position_and_size():
    """The fn-testbed concept is a colour and a shape; the caption also states the image's own
    position and size, and the image shows the object there, at that size."""
    spec = synthetic.preset_spec("fn-testbed", image_size=48)
    assert spec.details and spec.num_concepts == 16 and spec.image_size == 48
    names = synthetic.label_names(spec)
    assert len(set(names)) == 16
    assert all(len(n.split()) == 2 for n in names)  # "red circle": no position in the concept
    areas = {"small": [], "large": []}
    positions = set()
    for sample in synthetic.generate(spec, 60):
        colour, shape = names[sample.label].split()
        pos = [p for p in synthetic.POSITION_NAMES if p in sample.caption]
        size = [z for z in synthetic.SIZES if f"{z} " in sample.caption]
        assert colour in sample.caption and shape in sample.caption
        assert len(pos) == 1 and len(size) == 1, sample.caption
        positions.add(pos[0])
        img = np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB"), dtype=np.float32)
        near = np.abs(img - np.array(synthetic.COLOURS[colour])).max(axis=2) < 45
        ys, xs = np.nonzero(near)
        fx, fy = synthetic.POSITIONS[pos[0]]
        assert len(xs) > 10
        assert abs(xs.mean() / 48 - fx) < 0.12 and abs(ys.mean() / 48 - fy) < 0.12, sample.caption
        areas[size[0]].append(len(xs))
    assert len(positions) == 5  # the position varies within the concepts
    assert np.mean(areas["large"]) > 1.8 * np.mean(areas["small"])
    # the default data is untouched by the option: no size word in its captions
    default = synthetic.SyntheticSpec(num_concepts=16, image_size=32)
    assert not any(
        f" {z} " in f" {s.caption} "
        for s in synthetic.generate(default, 40)
        for z in ("small", "large")
    )


TESTBED_DIGEST = "c37ee0b708daf07c"  # sha256 of the fn-testbed's first 3 images, 2026-12-05


def test_fn_paraphrase_preset_states_only_the_concept_in_several_wordings():
    """fn-paraphrase: the fn-testbed's images (position and size drawn per image), captions
    that state the colour and the shape only, in several wordings; the fn-testbed's own bytes
    are untouched by the option."""
    spec = synthetic.preset_spec("fn-paraphrase")
    assert spec.paraphrase and not spec.details and spec.num_concepts == 16
    names = synthetic.label_names(spec)
    assert names == synthetic.label_names(synthetic.preset_spec("fn-testbed"))  # same concepts
    wordings, positions = set(), set()
    for sample in synthetic.generate(spec, 120):
        colour, shape = names[sample.label].split()
        assert colour in sample.caption and shape in sample.caption
        assert not any(p in sample.caption for p in synthetic.POSITION_NAMES), sample.caption
        assert not any(f"{z} " in sample.caption for z in synthetic.SIZES), sample.caption
        wordings.add(sample.caption.replace(colour, "{c}").replace(shape, "{s}"))
        img = np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB"), dtype=np.float32)
        ys, xs = np.nonzero(np.abs(img - np.array(synthetic.COLOURS[colour])).max(axis=2) < 45)
        positions.add((round(xs.mean() / 32 * 2), round(ys.mean() / 32 * 2)))
    assert len(wordings) == len(synthetic.TEMPLATES_PARAPHRASE)
    assert len(positions) >= 4  # the image's position varies, unsaid
    # the fn-testbed as it was before the option existed (its first captions and a digest of
    # its first images, recorded then)
    testbed = list(synthetic.generate(synthetic.preset_spec("fn-testbed"), 3))
    assert [s.caption for s in testbed] == [
        "bottom right: a large triangle, orange",
        "bottom left: a small circle, red",
        "a picture of a small purple triangle at the bottom right",
    ]
    assert hashlib.sha256(b"".join(s.image for s in testbed)).hexdigest()[:16] == TESTBED_DIGEST


def test_fn_testbed_preset_from_the_command_line(tmp_path, capsys):
    from clipfnd.cli.main import main

    out = tmp_path / "fn"
    args = ["data", "synthetic", "--preset", "fn-testbed", "--out", str(out)]
    assert main([*args, "--num-samples", "40", "--num-val", "8", "--num-concepts", "8"]) == 0
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["num_labels"] == 8  # a flag beside the preset wins
    assert manifest["meta"]["preset"] == "fn-testbed" and manifest["meta"]["image_size"] == 32
    capsys.readouterr()
    assert main([*args, "--num-samples", "4", "--num-concepts", "33"]) != 0
    assert "must be <= 32" in capsys.readouterr().err
    with pytest.raises(DataError, match="unknown preset 'nope'"):
        synthetic.preset_spec("nope")
