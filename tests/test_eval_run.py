"""``clipfnd eval`` end to end on every data layout, against reference computations.

The checkpoint is a randomly initialised ``clipfnd-tiny-vit`` written the way training writes
one (``model.safetensors`` + ``trainer_state.json``); nothing is trained or downloaded.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import open_clip  # noqa: E402
import safetensors.torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

from clipfnd.cli.main import main  # noqa: E402
from clipfnd.models.factory import create_clip  # noqa: E402
from clipfnd_eval.processes import Processes  # noqa: E402
from clipfnd_eval.retrieval import label_retrieval_metrics, retrieval_metrics  # noqa: E402
from clipfnd_eval.run import EvalOptions, run_eval  # noqa: E402
from clipfnd_eval.zeroshot import load_classnames, load_templates  # noqa: E402
from data_pipelines import load_shard_set  # noqa: E402
from data_pipelines.shards import iter_tar_samples, write_split  # noqa: E402
from data_pipelines.synthetic import SyntheticSpec, generate, label_names  # noqa: E402

from checkpoints import write_checkpoint  # noqa: E402

SPEC = SyntheticSpec(num_concepts=8, image_size=32)
CPU = Processes(0, 1, torch.device("cpu"))


def write_clip_benchmark(
    root: Path, samples, kind: str, classnames=None, templates=None, shard_size: int = 20
) -> Path:
    """clip_benchmark's layout: ROOT/test/{nshards.txt,0.tar,...} + metadata files."""
    split = root / "test"
    split.mkdir(parents=True)
    shards = [samples[i : i + shard_size] for i in range(0, len(samples), shard_size)]
    for n, shard in enumerate(shards):
        with wds.TarWriter(str(split / f"{n}.tar")) as tw:
            for i, s in enumerate(shard):
                tw.write({"__key__": f"s{n:03d}{i:05d}", **s})
    (split / "nshards.txt").write_text(f"{len(shards)}\n")
    (root / "dataset_type.txt").write_text(kind + "\n")
    if classnames:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def as_png(jpg: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpg)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    names = label_names(SPEC)
    out = {"run": write_checkpoint(root / "run")}
    write_split(
        root / "val", generate(SPEC, 64, "val"), shard_size=24, label_names=names, progress=False
    )
    write_split(
        root / "train",
        generate(SPEC, 96, "train"),
        shard_size=48,
        label_names=names,
        progress=False,
    )
    out["val"], out["train"] = root / "val", root / "train"
    raw = list(generate(SPEC, 40, "test"))
    cls = [
        {
            ("png" if i % 2 else "jpg"): as_png(s.image) if i % 2 else s.image,
            "cls": str(s.label).encode(),
        }
        for i, s in enumerate(raw)
    ]
    out["cb_cls"] = write_clip_benchmark(
        root / "cb_cls", cls, "classification", names, ["a photo of a {c}.", "{c}, drawn"]
    )
    ret = [
        {"webp": s.image, "txt": f"{s.caption}\nsomething about {names[s.label]}\n".encode()}
        for s in raw[:30]
    ]  # "webp" key holding JPEG bytes: decoding goes by content
    out["cb_ret"] = write_clip_benchmark(root / "cb_ret", ret, "retrieval")
    return out


def options(task: str, data: Path, **kw) -> EvalOptions:
    return EvalOptions(
        task=task, data=str(data), batch_size=16, num_workers=0, progress=False, **kw
    )


def test_retrieval_on_shards_equals_a_direct_computation(data):
    """run_eval against the checkpoint's model applied sample by sample (one caption each;
    the synthetic captions repeat, and a caption matches every image of its text)."""
    res = run_eval(data["run"], options("retrieval", data["val"]), CPU)
    bundle = create_clip("clipfnd-tiny-vit")
    model = bundle.model.eval()
    model.load_state_dict(
        safetensors.torch.load_file(
            str(data["run"] / "checkpoints/step_00000001/model.safetensors")
        )
    )
    samples = sorted(
        (s for sh in load_shard_set(data["val"]).shards for s in iter_tar_samples(sh.path)),
        key=lambda s: json.loads(s["json"])["index"],
    )
    with torch.no_grad():
        image = torch.cat(
            [
                model.encode_image(
                    bundle.preprocess_val(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))[None],
                    normalize=True,
                )
                for s in samples
            ]
        )
        captions = [s["txt"].decode() for s in samples]
        text = model.encode_text(bundle.tokenizer(captions), normalize=True)
    label = torch.tensor([json.loads(s["json"])["label"] for s in samples])
    want = retrieval_metrics(image, text, torch.arange(len(samples)), captions=captions)
    want.update(label_retrieval_metrics(image, text, label))
    assert res["data"]["layout"] == "clipfnd-shards"
    assert res["data"]["images"] == res["data"]["texts"] == 64
    repeated = [c for c in set(captions) if captions.count(c) > 1]
    assert res["data"]["duplicate_captions"] == {
        "texts": len(repeated),
        "captions": sum(captions.count(c) for c in repeated),
    }
    assert repeated
    assert res["model"]["step"] == 1
    assert res["metrics"].keys() == want.keys()
    for k, v in want.items():
        assert res["metrics"][k] == pytest.approx(v, abs=1e-9), k


def _reference_zeroshot(data_root: Path, classnames, templates, run: Path) -> dict[str, float]:
    """open_clip's own classifier builder and accuracy logic, on images read by hand."""
    bundle = create_clip("clipfnd-tiny-vit")
    bundle.model.load_state_dict(
        safetensors.torch.load_file(str(run / "checkpoints/step_00000001/model.safetensors"))
    )
    model = bundle.model.eval()
    images, targets = [], []
    nshards = int((data_root / "test/nshards.txt").read_text())
    for n in range(nshards):
        with tarfile.open(data_root / f"test/{n}.tar") as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for key in sorted({name.split(".")[0] for name in members}):
            img = members.get(f"{key}.jpg") or members.get(f"{key}.png")
            images.append(bundle.preprocess_val(Image.open(io.BytesIO(img)).convert("RGB")))
            targets.append(int(members[f"{key}.cls"]))
    target = torch.tensor(targets)
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            model,
            tokenizer=bundle.tokenizer,
            classnames=classnames,
            templates=[t.replace("{c}", "{}") for t in templates],
            num_classes_per_batch=3,
        )
        feats = model(image=torch.stack(images))["image_features"]
        logits = 100.0 * feats @ classifier
    # open_clip_train.zero_shot.accuracy, with .item() (its float(ndarray) fails on numpy 2.4)
    pred = logits.topk(5, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    top1, top5 = (correct[:k].reshape(-1).float().sum(0).item() / len(targets) for k in (1, 5))
    per_class = [correct[0][target == c].float().mean().item() for c in target.unique()]
    return {"top1": top1, "top5": top5, "mean_per_class_recall": sum(per_class) / len(per_class)}


def test_zeroshot_clip_benchmark_layout_equals_open_clip(data):
    res = run_eval(data["run"], options("zeroshot", data["cb_cls"]), CPU)
    assert res["data"]["layout"] == "clip_benchmark"
    assert res["data"]["num_images"] == 40
    assert res["zeroshot"]["num_templates"] == 2
    assert res["zeroshot"]["templates"].startswith("dataset")
    want = _reference_zeroshot(
        data["cb_cls"], label_names(SPEC), ["a photo of a {c}.", "{c}, drawn"], data["run"]
    )
    for k, v in want.items():
        assert res["metrics"][k] == pytest.approx(v, abs=1e-9), k


def test_zeroshot_files_and_builtin_imagenet_lists(data, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(label_names(SPEC)) + "\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a drawing of a {c}\n")
    res = run_eval(
        data["run"],
        options("zeroshot", data["val"], classnames=str(names), templates=str(templates)),
        CPU,
    )
    assert res["zeroshot"] == {
        "classnames": str(names),
        "num_classes": 8,
        "num_templates": 1,
        "templates": str(templates),
    }
    assert set(res["metrics"]) == {"top1", "top5", "mean_per_class_recall"}
    # open_clip's ImageNet names (1000 classes; our labels 0..7 are valid ids there)
    res = run_eval(
        data["run"],
        options("zeroshot", data["val"], classnames="imagenet", templates=str(templates)),
        CPU,
    )
    assert res["zeroshot"]["num_classes"] == 1000
    assert load_classnames("imagenet") == list(open_clip.IMAGENET_CLASSNAMES)
    assert load_templates("openai") == list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    assert load_templates("simple") == list(open_clip.SIMPLE_IMAGENET_TEMPLATES)


def test_retrieval_clip_benchmark_several_captions(data):
    res = run_eval(data["run"], options("retrieval", data["cb_ret"]), CPU)
    assert res["data"]["images"] == 30 and res["data"]["texts"] == 60
    m = res["metrics"]
    assert 0 <= m["i2t_R@1"] <= m["i2t_R@5"] <= m["i2t_R@10"] <= 1
    assert "label_i2t_R@1" not in m  # several captions per image: no concept-level metrics


def test_csv_layout_groups_captions_and_names_string_labels(data, tmp_path):
    rows = []
    for i, s in enumerate(generate(SPEC, 12, "test")):
        (tmp_path / f"{i}.jpg").write_bytes(s.image)
        for c in (s.caption, f"another caption {i}"):
            rows.append({"filepath": f"{i}.jpg", "title": c, "label": f"class-{s.label}"})
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["filepath", "title", "label"])
        w.writeheader()
        w.writerows(rows)
    res = run_eval(data["run"], options("retrieval", path), CPU)
    assert res["data"]["layout"] == "csv"
    assert (res["data"]["images"], res["data"]["texts"]) == (12, 24)
    res = run_eval(data["run"], options("zeroshot", path), CPU)
    assert res["zeroshot"]["num_classes"] == len({r["label"] for r in rows})


def test_hf_saved_dataset_and_parquet(data, tmp_path):
    import datasets

    raw = list(generate(SPEC, 16, "test"))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "label": datasets.ClassLabel(names=label_names(SPEC)),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "image": [Image.open(io.BytesIO(s.image)) for s in raw],
            "caption": [s.caption for s in raw],
            "label": [s.label for s in raw],
        },
        features=features,
    )
    datasets.DatasetDict({"test": ds, "train": ds}).save_to_disk(str(tmp_path / "saved"))
    res = run_eval(data["run"], options("zeroshot", tmp_path / "saved"), CPU)
    assert (res["data"]["layout"], res["data"]["split"], res["data"]["num_images"]) == (
        "hf",
        "test",
        16,
    )
    assert res["zeroshot"]["classnames"] == "dataset (hf)"
    ds.to_parquet(str(tmp_path / "test-00000.parquet"))
    res = run_eval(data["run"], options("retrieval", tmp_path / "test-00000.parquet"), CPU)
    assert (res["data"]["images"], res["data"]["texts"]) == (16, 16)


def test_linear_probe_and_knn_on_shards(data):
    res = run_eval(data["run"], options("knn", data["val"], train_data=str(data["train"])), CPU)
    assert res["train_data"]["num_images"] == 96
    assert res["knn"] == {"k": 20, "temperature": 0.07}
    assert 0.0 <= res["metrics"]["top1"] <= 1.0
    res = run_eval(
        data["run"], options("linear-probe", data["val"], train_data=str(data["train"])), CPU
    )
    assert {"top1", "C", "val_top1"} <= set(res["metrics"])


def test_cli_eval_writes_results(data, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(data["run"]),
            "--task",
            "zeroshot",
            "--data",
            str(data["cb_cls"]),
            "--out",
            str(out),
            "--num-workers",
            "0",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    written = json.loads(out.read_text())
    assert written["task"] == "zeroshot" and "top1" in written["metrics"]
    assert json.loads(capsys.readouterr().out) == written


def test_cli_eval_refuses_an_unwritable_out_before_encoding(data, tmp_path, capsys, monkeypatch):
    """An ``--out`` that cannot be written is refused at once, before any image is encoded."""
    import clipfnd_eval.run as run_mod

    def never(*a, **k):
        raise AssertionError("encoded although --out cannot be written")

    monkeypatch.setattr(run_mod, "encode_dataset", never)
    (tmp_path / "a_file").write_text("")
    for bad, message in (
        (tmp_path / "a_file" / "results.json", "cannot write there"),
        (tmp_path, "is a folder"),
    ):
        args = ["eval", "--checkpoint", str(data["run"]), "--task", "retrieval"]
        rc = main([*args, "--data", str(data["val"]), "--out", str(bad), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and str(bad) in err, err


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--checkpoint", "{tmp}/missing", "--task", "retrieval", "--data", "{val}"],
            "does not exist",
        ),
        (["--checkpoint", "{run}", "--task", "knn", "--data", "{val}"], "needs --train-data"),
        (["--checkpoint", "{run}", "--task", "retrieval", "--data", "{tmp}"], "no known dataset"),
        (["--checkpoint", "{run}", "--task", "zeroshot", "--data", "{cb_ret}"], "class names"),
        (["--checkpoint", "{val}", "--task", "retrieval", "--data", "{val}"], "no checkpoint"),
    ],
)
def test_cli_eval_errors_are_one_clear_line(data, tmp_path, capsys, args, message):
    fill = {"tmp": tmp_path, "val": data["val"], "run": data["run"], "cb_ret": data["cb_ret"]}
    rc = main(["eval", *[a.format(**fill) for a in args], "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("clipfnd: error:") and message in err


# --- agreement with clip_benchmark ---------------------------------------------------------------
def _read_clip_benchmark(root: Path, bundle) -> list[tuple[torch.Tensor, dict[str, bytes]]]:
    """Each sample of a clip_benchmark split: the preprocessed image and its tar members."""
    out = []
    for n in range(int((root / "test/nshards.txt").read_text())):
        with tarfile.open(root / f"test/{n}.tar") as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for key in sorted({name.split(".")[0] for name in members}):
            mine = {
                name.split(".", 1)[1]: v for name, v in members.items() if name.split(".")[0] == key
            }
            img = next(mine[e] for e in ("jpg", "png", "webp") if e in mine)
            out.append((bundle.preprocess_val(Image.open(io.BytesIO(img)).convert("RGB")), mine))
    return out


def _checkpoint_model(run: Path):
    bundle = create_clip("clipfnd-tiny-vit")
    bundle.model.load_state_dict(
        safetensors.torch.load_file(str(run / "checkpoints/step_00000001/model.safetensors"))
    )
    bundle.model.eval()
    return bundle


def test_retrieval_agrees_with_clip_benchmark(data, tmp_path):
    """clip_benchmark's own retrieval evaluation (its `evaluate`, `recall_at_k`) on the same
    model and data: `clipfnd eval`'s `*_clip_benchmark` keys equal it always, and its main
    Recall@K too where all captions differ. Where captions repeat, a caption of the image's
    own text counts as a true match: here that raises R@1 above clip_benchmark's both ways."""
    from clip_benchmark.metrics import zeroshot_retrieval

    names = label_names(SPEC)
    raw = list(generate(SPEC, 40, "test"))
    unique = [
        {
            "jpg": s.image,
            "txt": f"{s.caption} number {i}\nsample {i} shows {names[s.label]}\n".encode(),
        }
        for i, s in enumerate(raw)
    ]
    repeated = [
        {"jpg": s.image, "txt": f"{names[s.label]}\n".encode()} for s in raw
    ]  # one caption per concept
    bundle = _checkpoint_model(data["run"])
    for kind, samples in (("unique", unique), ("repeated", repeated)):
        root = write_clip_benchmark(tmp_path / kind, samples, "retrieval")
        ours = run_eval(data["run"], options("retrieval", root), CPU)["metrics"]
        read = _read_clip_benchmark(root, bundle)
        batches = [
            (
                torch.stack([x for x, _ in read[i : i + 16]]),
                [m["txt"].decode().strip().split("\n") for _, m in read[i : i + 16]],
            )
            for i in range(0, len(read), 16)
        ]
        theirs = zeroshot_retrieval.evaluate(
            bundle.model, batches, bundle.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10]
        )
        for k in (1, 5, 10):
            for mine, cb in (("t2i", "image"), ("i2t", "text")):
                want = theirs[f"{cb}_retrieval_recall@{k}"]
                got = ours[f"{mine}_R@{k}_clip_benchmark"]
                assert got == pytest.approx(want, abs=1e-9), (kind, mine, k)
                if kind == "unique":
                    assert ours[f"{mine}_R@{k}"] == pytest.approx(want, abs=1e-9), (mine, k)
    # repeated captions: a caption of the image's text is a true match (random model)
    assert ours["i2t_R@1"] > theirs["text_retrieval_recall@1"]
    assert ours["t2i_R@1"] > theirs["image_retrieval_recall@1"]


class BatchList(list):
    """Batches with the ``dataset.classes`` clip_benchmark's classification reads."""

    def __init__(self, batches, classes):
        super().__init__(batches)
        self.dataset = type("Dataset", (), {"classes": classes})()


def test_zeroshot_agrees_with_clip_benchmark(data, monkeypatch):
    """clip_benchmark's zero-shot classification `evaluate` (its classifier, logits, top-k and
    balanced accuracy) on the same model and data gives `clipfnd eval`'s figures. Its
    `accuracy` ends in `float(ndarray)`, which numpy 2.4 refuses: only that line is replaced."""
    from clip_benchmark.metrics import zeroshot_classification

    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

    monkeypatch.setattr(zeroshot_classification, "accuracy", accuracy)
    bundle = _checkpoint_model(data["run"])
    read = _read_clip_benchmark(data["cb_cls"], bundle)
    batches = BatchList(
        [
            (
                torch.stack([x for x, _ in read[i : i + 16]]),
                torch.tensor([int(m["cls"]) for _, m in read[i : i + 16]]),
            )
            for i in range(0, len(read), 16)
        ],
        label_names(SPEC),
    )
    templates = ["a photo of a {c}.", "{c}, drawn"]
    theirs = zeroshot_classification.evaluate(
        bundle.model, batches, bundle.tokenizer, label_names(SPEC), templates, "cpu", amp=False
    )
    ours = run_eval(data["run"], options("zeroshot", data["cb_cls"]), CPU)["metrics"]
    assert ours["top1"] == pytest.approx(theirs["acc1"], abs=1e-9)
    assert ours["top5"] == pytest.approx(theirs["acc5"], abs=1e-9)
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-9)


def test_a_truncated_shard_is_named_and_the_rest_evaluated(data, tmp_path, caplog):
    """Training skips a truncated shard; evaluation does too: what could be read is evaluated,
    the shard is named in a warning and in the results, and only an empty set is refused."""
    import logging
    import shutil

    from data_pipelines import DataError

    val = tmp_path / "val"
    shutil.copytree(data["val"], val)
    shard = sorted(val.glob("shard-*.tar"))[1]  # 24 samples
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    with caplog.at_level(logging.WARNING):
        res = run_eval(data["run"], options("retrieval", val), CPU)
    assert 40 <= res["data"]["num_images"] < 64
    assert res["data"]["unreadable_parts"] and str(shard) in res["data"]["unreadable_parts"][0]
    assert str(shard) in caplog.text
    for other in sorted(val.glob("shard-*.tar")):
        other.write_bytes(other.read_bytes()[:1100])  # cut inside the first sample
    with pytest.raises(DataError, match="no readable image.*unreadable"):
        run_eval(data["run"], options("retrieval", val), CPU)


def test_cli_eval_of_a_stock_model_and_of_an_export_equals_the_checkpoint(data, tmp_path, capsys):
    """``--model local-dir:EXPORT`` (and ``--model NAME --pretrained FILE``) measure the same
    numbers as ``--checkpoint`` for the weights the export holds."""
    common = ["--task", "zeroshot", "--data", str(data["cb_cls"]), "--num-workers", "0"]
    common += ["--no-progress", "--device", "cpu"]
    assert main(["eval", "--checkpoint", str(data["run"]), *common]) == 0
    want = json.loads(capsys.readouterr().out)["metrics"]
    export = tmp_path / "export"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(data["run"]),
                "--format",
                "open_clip",
                "--out",
                str(export),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", "--model", f"local-dir:{export}", *common]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["metrics"] == want and got["model"]["model_name"] == f"local-dir:{export}"
    weights = str(export / "open_clip_model.safetensors")
    assert main(["eval", "--model", "clipfnd-tiny-vit", "--pretrained", weights, *common]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == want
    assert (
        main(["eval", "--model", "clipfnd-tiny-vit", "--checkpoint", str(data["run"]), *common])
        == 2
    )
    assert "not both" in capsys.readouterr().err
