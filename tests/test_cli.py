"""The `rmtkd` command line, end to end on a tiny BERT with a real tokenizer (Hub calls go to the loopback server)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as tf
from conftest import tiny_config
from datasets import Dataset
from testing_utils import WORDS, word_tokenizer

import hf_rmtkd  # noqa: F401  (registers the RMTKD Auto classes)
from hf_rmtkd.cli import main


def _sentences(n=96, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user-model")
    torch.manual_seed(0)
    config = tiny_config("bert", num_labels=2)
    config.vocab_size = len(WORDS) + 5
    tf.BertForSequenceClassification(config).save_pretrained(folder)
    word_tokenizer(folder).save_pretrained(folder)
    return folder


def _write(folder, kind: str):
    texts = _sentences()
    if kind == "csv":
        path = folder / "data.csv"
        path.write_text("label,sentence\n" + "".join(f"{i % 2},{t}\n" for i, t in enumerate(texts)))
    elif kind == "tsv":
        path = folder / "data.tsv"
        path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)))
    elif kind == "jsonl":
        path = folder / "data.jsonl"
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    elif kind == "txt":
        path = folder / "data.txt"
        path.write_text("\n".join(texts) + "\n")
    else:
        path = folder / "data-folder"
        Dataset.from_dict({"sentence": texts}).save_to_disk(str(path))
    return path


def test_analyze_prints_the_report_and_writes_plots(model_dir, tmp_path, capsys):
    data = _write(tmp_path, "csv")
    main(["analyze", str(model_dir), "--data", str(data), "--plots", str(tmp_path / "plots"), "--estimator", "mp_fit"])
    out = capsys.readouterr().out
    assert "encoder.layer.0.output.dense" in out and "sigma2" in out
    assert len(list((tmp_path / "plots").glob("*.png"))) >= 2


@pytest.mark.parametrize("kind", ["tsv", "jsonl", "txt", "folder"])
def test_compress_writes_a_checkpoint_that_loads_with_its_tokenizer(model_dir, tmp_path, kind, capsys):
    data, output = _write(tmp_path, kind), tmp_path / "compressed"
    main(["compress", str(model_dir), "--data", str(data), "--output", str(output), "--samples", "64"])
    assert "fewer" in capsys.readouterr().out
    model = tf.AutoModelForSequenceClassification.from_pretrained(output)
    assert model.config.reduced_modules and model.config.calibration["n_tokens"] > 0
    assert model.num_parameters() < tf.AutoModelForSequenceClassification.from_pretrained(model_dir).num_parameters()
    classify = tf.pipeline("text-classification", model=str(output))
    assert classify("good film")[0]["label"] in {"LABEL_0", "LABEL_1"}


def test_compress_options_reach_the_records(model_dir, tmp_path):
    data, output = _write(tmp_path, "csv"), tmp_path / "compressed"
    main(["compress", str(model_dir), "--data", str(data), "--output", str(output), "--hidden_width",
          "--target_modules", "none", "--max_output_error", "0.2", "--seed", "5"])  # fmt: skip
    config = tf.AutoConfig.from_pretrained(output)
    assert config.hidden_width is not None and config.reduced_modules == {}
    assert config.hidden_width.budget_rank is not None and config.calibration["seed"] == 5


def test_compress_embeddings_flag_factorises_the_token_table(model_dir, tmp_path):
    data, output = _write(tmp_path, "csv"), tmp_path / "compressed"
    main(["compress", str(model_dir), "--data", str(data), "--output", str(output), "--embeddings"])
    records = tf.AutoConfig.from_pretrained(output).reduced_modules
    assert records["bert.embeddings.word_embeddings"].kind == "embedding"
    model = tf.AutoModelForSequenceClassification.from_pretrained(output)
    assert type(model.model.bert.embeddings.word_embeddings).__name__ == "LowRankEmbedding"


def test_push_uploads_a_checkpoint_that_loads_by_id(model_dir, tmp_path, capsys):
    data, output = _write(tmp_path, "csv"), tmp_path / "compressed"
    main(["compress", str(model_dir), "--data", str(data), "--output", str(output)])
    main(["push", str(output), "cli-user/tiny-rmtkd"])
    assert "pushed" in capsys.readouterr().out
    reloaded = tf.AutoModelForSequenceClassification.from_pretrained("cli-user/tiny-rmtkd")
    assert reloaded.config.reduced_modules.keys() == tf.AutoConfig.from_pretrained(output).reduced_modules.keys()
    assert tf.AutoTokenizer.from_pretrained("cli-user/tiny-rmtkd")("good film").input_ids


@pytest.mark.parametrize(
    "argv,error,match",
    [
        (["shrink", "m"], SystemExit, "unknown command 'shrink'"),
        (["compress", "--data", "x"], SystemExit, "usage: rmtkd compress MODEL"),
        (["analyze", "{model}", "--data", "{tmp}/missing.csv"], ValueError, "does not exist"),
        (["analyze", "{model}", "--data", "{tmp}/data.xml"], ValueError, "unsupported file type '.xml'"),
        (["analyze", "{model}", "--data", "{csv}", "--text_column", "review"], ValueError, "'review' is not among"),
        (["analyze", "{model}", "--data", "{csv}", "--samples", "0"], ValueError, "`samples` must be >= 1"),
        (["analyze", "{model}", "--data", "{csv}", "--tau", "2"], ValueError, "`tau` must be in"),
    ],
)
def test_bad_arguments_say_what_is_wrong(model_dir, tmp_path, argv, error, match):
    csv = _write(tmp_path, "csv")
    (tmp_path / "data.xml").write_text("<rows/>")
    argv = [a.format(model=model_dir, tmp=tmp_path, csv=csv) for a in argv]
    with pytest.raises(error, match=match):
        main(argv)


def test_the_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "hf_rmtkd.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "rmtkd compress MODEL" in result.stdout
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="console_scripts") if e.name == "rmtkd"] == ["hf_rmtkd.cli:main"]


def test_the_readme_commands_run_as_written(model_dir, resnet_dir, tmp_path, monkeypatch, capsys):
    from conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("### Command line\n\n```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#")[0].split() for line in block.strip().splitlines()]
    assert [line[:2] for line in lines] == [["rmtkd", c] for c in ("analyze", "compress", "compress", "push")]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "path" / "to").mkdir(parents=True)
    (tmp_path / "path" / "to" / "model").symlink_to(model_dir)
    _write(tmp_path, "csv").rename(tmp_path / "sentences.csv")
    (tmp_path / "path" / "to" / "cnn").symlink_to(resnet_dir)
    _image_data(tmp_path, "parquet").rename(tmp_path / "images.parquet")
    for line in lines:
        main(line[1:])
    out = capsys.readouterr().out
    assert "sigma2" in out and "fewer" in out and "pushed model-rmtkd to user/model-rmtkd" in out
    assert tf.AutoModelForSequenceClassification.from_pretrained("user/model-rmtkd").config.reduced_modules
    cnn = tf.AutoModelForImageClassification.from_pretrained(tmp_path / "cnn-rmtkd")
    assert {record.kind for record in cnn.config.reduced_modules.values()} == {"conv"}


def test_compress_and_analyze_take_a_sentence_transformers_folder(tmp_path, capsys):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    torch.manual_seed(0)
    config = tiny_config("bert")
    config.vocab_size = len(WORDS) + 5
    tf.BertModel(config).save_pretrained(tmp_path / "bert")
    word_tokenizer(tmp_path / "bert").save_pretrained(tmp_path / "bert")
    modules = [Transformer(str(tmp_path / "bert")), Pooling(config.hidden_size), Normalize()]
    st.SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "st"))
    data = _write(tmp_path, "txt")
    main(["analyze", str(tmp_path / "st"), "--data", str(data)])
    assert "encoder.layer.1.output.dense    ffn" in capsys.readouterr().out
    main(["compress", str(tmp_path / "st"), "--data", str(data), "--output", str(tmp_path / "out"), "--hidden_width"])
    assert "SentenceTransformer:" in capsys.readouterr().out
    reloaded = st.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert [type(m).__name__ for m in reloaded] == ["Transformer", "Pooling", "Normalize"]
    width = reloaded[0].model.config.hidden_width.rank
    assert type(reloaded[0].model).__name__ == "RMTKDModel" and width < 32
    assert reloaded.encode(["good film"]).shape[1] == width


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    from testing_utils import tiny_resnet

    folder = tmp_path_factory.mktemp("resnet")
    tiny_resnet().save_pretrained(folder)
    return folder


def _image_data(folder, kind: str, size=8):
    from testing_utils import image_blobs, write_image_parquet

    blobs = image_blobs(size=size)
    if kind == "parquet":  # the layout of ../shared/data/cifar10_jpeg: encoded bytes in a `jpeg` column
        path = write_image_parquet(folder / f"images{size}.parquet", blobs)
    elif kind == "imagefolder":
        path = folder / f"pictures{size}"
        for i, blob in enumerate(blobs):
            (path / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
            (path / f"class{i % 2}" / f"{i}.png").write_bytes(blob)
    else:  # a datasets folder with an Image feature
        import datasets

        path = folder / f"image-dataset{size}"
        features = datasets.Features({"picture": datasets.Image(), "label": datasets.Value("int64")})
        rows = {"picture": [{"bytes": b, "path": None} for b in blobs], "label": [0] * len(blobs)}
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["parquet", "imagefolder", "datasets"])
def test_compress_calibrates_an_image_model_on_images(resnet_dir, tmp_path, kind, capsys):
    from hf_rmtkd.cli_data import DataArguments, image_processor, read_images

    data = _image_data(tmp_path, kind)
    output = tmp_path / "resnet-rmtkd"
    main(["compress", str(resnet_dir), "--data", str(data), "--output", str(output), "--convolutions", "factorize"])
    assert "% fewer); written to" in capsys.readouterr().out
    reloaded = tf.AutoModelForImageClassification.from_pretrained(output)
    records = reloaded.config.reduced_modules
    assert records and {r.kind for r in records.values()} == {"conv"}
    # Every route decodes the same pixels, normalised with the config's mean and std.
    images = read_images(DataArguments(data=str(data), samples=4))
    assert [image.size for image in images] == [(8, 8)] * 4
    config = reloaded.rmtkd_inner_model.config
    process, processor = image_processor(str(resnet_dir), config)
    pixels = process(images)
    first = torch.tensor(np.asarray(images[0]), dtype=torch.float32).permute(2, 0, 1) / 255
    expected = (first - torch.tensor(config.image_mean).view(3, 1, 1)) / torch.tensor(config.image_std).view(3, 1, 1)
    assert processor is None and pixels.shape == (4, 3, 8, 8)
    torch.testing.assert_close(pixels[0], expected)


def test_analyze_reads_images_and_the_default_reduces_channels(resnet_dir, tmp_path, capsys):
    data = _image_data(tmp_path, "parquet")
    main(["analyze", str(resnet_dir), "--data", str(data), "--samples", "32"])
    out = capsys.readouterr().out
    assert "sigma2" in out and "layer3.0.conv2" in out and " ffn " in out
    main(["analyze", str(resnet_dir), "--data", str(data), "--convolutions", "factorize"])
    assert " conv " in capsys.readouterr().out


def test_a_saved_image_processor_is_used_and_travels_with_the_output(resnet_dir, tmp_path):
    import shutil

    folder = tmp_path / "resnet-with-processor"
    shutil.copytree(resnet_dir, folder)
    tf.ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(
        folder
    )
    data = _image_data(tmp_path, "parquet", size=12)  # resized to 8 x 8 by the processor
    output = tmp_path / "out"
    main(["compress", str(folder), "--data", str(data), "--output", str(output), "--convolutions", "factorize"])
    assert (output / "preprocessor_config.json").is_file()
    assert list(tf.AutoImageProcessor.from_pretrained(output).image_std) == [0.25] * 3


def test_a_broken_image_processor_file_is_refused_not_replaced(resnet_dir, tmp_path):
    import shutil

    folder = tmp_path / "resnet-broken-processor"
    shutil.copytree(resnet_dir, folder)
    (folder / "preprocessor_config.json").write_text('{"image_processor_type": "NoSuchImageProcessor"}')
    data = _image_data(tmp_path, "parquet")
    with pytest.raises(ValueError, match="has a preprocessor_config.json that does not load"):
        main(["analyze", str(folder), "--data", str(data)])


@pytest.mark.parametrize(
    "make,argv,match",
    [
        ("parquet12", [], "no image processor to resize it: its config's image_size is 8 x 8"),
        ("parquet", ["--image_column", "photo"], "`image_column` 'photo' is not among the data's columns"),
        ("parquet", ["--image_column", "label"], "`image_column` 'label' holds int values, not images"),
        ("parquet", ["--convolutions", "lowrank"], "`convolutions` must be one of"),
    ],
)
def test_bad_image_input_says_what_is_wrong(resnet_dir, tmp_path, make, argv, match):
    data = _image_data(tmp_path, "parquet", size=12 if make == "parquet12" else 8)
    with pytest.raises(ValueError, match=match):
        main(["analyze", str(resnet_dir), "--data", str(data), *argv])
