"""The paper-scale path on a tiny Stable Diffusion (with a VAE): every way SD 1.4 is loaded,
and `ncis run --params configs/<benchmark>.yaml` from fake raw data to metrics."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from recompute import assert_metrics_recompute

from ncis.config import load_params
from ncis.datasets import image_folder
from ncis.diffusion import load_pipeline, resolution
from ncis.errors import UserError

ROOT = Path(__file__).parents[1]


# --- a single file in the original Stable Diffusion layout -------------------------------------
# diffusers reads such files (from_single_file) but has no writer, so the test writes one: the
# inverse of diffusers' own key mapping (diffusers/loaders/single_file_utils.py), for SD 1.x's
# component types. Loading it back must give every tensor of the folder it came from.

RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _renamed(rest: str, names: dict[str, str]) -> str:
    for old, new in names.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _original_key(key: str, fixed: dict[str, str], rules: list) -> str:
    if key in fixed:
        return fixed[key]
    for pattern, rename in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return rename(*match.groups())
    raise AssertionError(f"no original name for {key}")


def original_sd_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """UNet, VAE and CLIP text encoder under the CompVis checkpoint's names (sd-v1-4.ckpt's layout)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    per = pipe.unet.config.layers_per_block + 1  # original blocks per level (+1: the down/upsampler)
    attended = {int(k.split(".")[1]) for k in pipe.unet.state_dict() if k.startswith("up_blocks.") and ".attentions." in k}
    unet_rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda b, i, r: f"input_blocks.{1 + int(b) * per + int(i)}.0.{_renamed(r, RESNET_NAMES)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, i, r: f"input_blocks.{1 + int(b) * per + int(i)}.1.{r}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda b, r: f"input_blocks.{int(b) * per + per}.0.op.{r}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda i, r: f"middle_block.{2 * int(i)}.{_renamed(r, RESNET_NAMES)}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda r: f"middle_block.1.{r}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda b, i, r: f"output_blocks.{int(b) * per + int(i)}.0.{_renamed(r, RESNET_NAMES)}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, i, r: f"output_blocks.{int(b) * per + int(i)}.1.{r}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda b, r: f"output_blocks.{int(b) * per + per - 1}.{2 if int(b) in attended else 1}.conv.{r}"),
    ]  # fmt: skip
    levels = len(pipe.vae.config.block_out_channels)
    vae_rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda b, i, r: f"encoder.down.{b}.block.{i}.{r.replace('conv_shortcut', 'nin_shortcut')}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda b, r: f"encoder.down.{b}.downsample.conv.{r}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda b, i, r: f"decoder.up.{levels - 1 - int(b)}.block.{i}.{r.replace('conv_shortcut', 'nin_shortcut')}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", lambda b, r: f"decoder.up.{levels - 1 - int(b)}.upsample.conv.{r}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", lambda part, i, r: f"{part}.mid.block_{int(i) + 1}.{r}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", lambda part, r: f"{part}.mid.attn_1.{_renamed(r, VAE_ATTENTION_NAMES)}"),
    ]  # fmt: skip
    checkpoint = {}
    for key, value in pipe.unet.state_dict().items():
        checkpoint["model.diffusion_model." + _original_key(key, DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], unet_rules)] = value
    for key, value in pipe.vae.state_dict().items():
        name = _original_key(key, DIFFUSERS_TO_LDM_MAPPING["vae"], vae_rules)
        if ".mid.attn_1." in name and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        checkpoint["first_stage_model." + name] = value
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers 5 flattened CLIPTextModel; the checkpoint keeps the transformers 4 names
        checkpoint["cond_stage_model.transformer." + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    return {key: value.contiguous() for key, value in checkpoint.items()}


@pytest.fixture(scope="module")
def tiny_sd_file(tiny_sd_dir, tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("single-file") / "sd-tiny.safetensors"
    save_file(original_sd_checkpoint(load_pipeline(tiny_sd_dir)), str(path))
    return path


def _same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys(), name
        assert all(torch.equal(left[k], right[k]) for k in left), name


def test_a_single_original_layout_file_loads_whole_with_a_config_folder(tiny_sd_dir, tiny_sd_file):
    folder, single = load_pipeline(tiny_sd_dir), load_pipeline(tiny_sd_file, single_file_config=str(tiny_sd_dir))
    _same_weights(folder, single)
    assert resolution(single) == 64 and single.vae.config.scaling_factor == folder.vae.config.scaling_factor
    assert single.scheduler.config == folder.scheduler.config
    assert single.tokenizer("A high-quality image of the seal").input_ids == folder.tokenizer("A high-quality image of the seal").input_ids


def test_the_papers_ckpt_form_loads_whole_when_trusted(tiny_sd_dir, tiny_sd_file, tmp_path):
    """sd-v1-4.ckpt's form (a pickled {"state_dict": ...}): refused by default, whole when allowed."""
    from safetensors.torch import load_file

    ckpt = tmp_path / "sd-tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_sd_file)), "global_step": 1}, ckpt)
    with pytest.raises(UserError, match="allow_pickle"):
        load_pipeline(ckpt, single_file_config=str(tiny_sd_dir))
    _same_weights(load_pipeline(ckpt, single_file_config=str(tiny_sd_dir), allow_pickle=True), load_pipeline(tiny_sd_dir))


def test_a_single_file_without_configs_offline_says_where_they_go(tiny_sd_file, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for config in ("", "ncis-test/not-cached"):
        with pytest.raises(UserError) as refused:
            load_pipeline(tiny_sd_file, single_file_config=config)
        message = str(refused.value)
        assert "\n" not in message and str(tiny_sd_file) in message and "HF cache" in message and "diffusers folder" in message


def _fake_hf_cache(tmp_path, monkeypatch, repo_id: str, folder: Path) -> None:
    """`folder` as `repo_id`'s snapshot in a Hugging Face cache, with the hub unreachable."""
    import huggingface_hub.constants

    revision = "0" * 40
    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_the_configs_hub_id_loads_offline_from_the_hf_cache(tiny_sd_dir, tiny_sd_file, tmp_path, monkeypatch):
    """configs/cifar100.yaml's `diffusion.model` (a hub id) from a cache, no network; a single file
    takes its configs and tokenizer from the same cached id (the benchmark's default model)."""
    from ncis.config import load_params
    from ncis.diffusion import load_for_params

    _fake_hf_cache(tmp_path, monkeypatch, "CompVis/stable-diffusion-v1-4", tiny_sd_dir)
    folder = load_pipeline(tiny_sd_dir)
    by_id = load_params(ROOT / "configs" / "cifar100.yaml")
    assert by_id.diffusion.model == "CompVis/stable-diffusion-v1-4"
    _same_weights(load_for_params(by_id, "cpu", "auto"), folder)
    by_file = load_params(ROOT / "configs" / "cifar100.yaml", overrides=[f"diffusion.model={tiny_sd_file}"])
    _same_weights(load_for_params(by_file, "cpu", "auto"), folder)
    with pytest.raises(UserError, match="cannot load 'ncis-test/absent'"):
        load_pipeline("ncis-test/absent")


# --- `ncis run` with the paper's configs on fake raw data --------------------------------------

PER_CLASS = 3  # training images per class
OOD_PER_FOLDER = 25  # more than evaluate scores of each (0.2 x 100 ID test images): the seeded subset is drawn
EVALUATE_BATCH = 64


def _tiny_run(tmp_path, model_dir, data_root, params_file, *more) -> list[str]:
    """`ncis run --params <paper config>`, each stage cut to seconds with the keys a user would --set."""
    overrides = [
        f"outputs={tmp_path / 'outputs'}", f"data.root={data_root}", f"diffusion.model={model_dir}",
        "embed.steps=1", "embed.noise_draws=2", "embed.batch_size=32",
        "cvpn.epochs=2", "sample.candidates=40", "sample.keep=2", "sample.rounds=1", "sample.reg=1e-3",
        "synthesize.steps=2", "synthesize.batch_size=50", "synthesize.images_per_class=4",
        "synthesize.control_per_class=1", "synthesize.preview_per_class=1",
        "classifier.arch=small_cnn", "classifier.epochs=1", "classifier.batch_size=64", "classifier.outlier_batch_size=64",
        f"evaluate.batch_size={EVALUATE_BATCH}", *more,
    ]  # fmt: skip
    args = ["run", "--no-tracking", "--params", str(ROOT / params_file)]
    for override in overrides:
        args += ["--set", override]
    return args


def _check_every_boundary(outputs: Path, benchmark: str, image_size: int, ood_sets: set[str], text_width: int, model_dir: Path) -> None:
    from ncis.datasets import get_benchmark, load_images
    from ncis.diffusion import load_pipeline, token_embedding_table
    from ncis.io import load_arrays

    train, train_labels = load_images(outputs / "data" / "train")
    assert train.shape == (100 * PER_CLASS, image_size, image_size, 3)
    embedded = load_arrays(outputs / "embed" / "embeddings.npz")
    assert embedded["embeddings"].shape == (100 * PER_CLASS, text_width)
    np.testing.assert_array_equal(embedded["labels"], train_labels)
    # Each class's vectors start from the paper's token (first token of token_names: 'fish' for
    # aquarium_fish), not from the dataset name's first token.
    pipe = load_pipeline(model_dir)
    first_tokens = [pipe.tokenizer(name, add_special_tokens=False).input_ids[0] for name in get_benchmark(benchmark).token_names]
    table = token_embedding_table(pipe).weight.detach().numpy()
    np.testing.assert_array_equal(embedded["class_tokens"], table[first_tokens])
    assert (outputs / "cvpn" / "model.safetensors").exists()
    assert load_arrays(outputs / "sample" / "outliers.npz")["outliers"].shape == (100, 2, text_width)
    images, labels = load_images(outputs / "synthesize" / "images")
    # 4 images per class, all from its first outlier embedding (the config renders 8 per embedding),
    # decoded RGB and saved at the paper's 256
    assert images.shape == (400, 256, 256, 3) and np.bincount(labels).tolist() == [4] * 100
    assert (outputs / "classifier").is_dir()
    metrics = json.loads((outputs / "metrics.json").read_text())
    assert metrics["benchmark"] == benchmark and set(metrics["ood"]) == ood_sets
    # Every number recomputed from the saved classifier and data, the seeded OOD subset included
    # (the config's ood_fraction 0.2 of 100 ID test images: 20 of each folder's OOD_PER_FOLDER).
    params = load_params(ROOT / "configs" / f"{benchmark}.yaml")
    assert_metrics_recompute(outputs, metrics, benchmark, EVALUATE_BATCH, params.evaluate.ood_fraction, params.seed)


def _ood_folders(root: Path, folders: list[str], rng, like: tuple[tuple[int, int], str]) -> None:
    """One odd image, the rest noise of the ID images' raw size and format (`like`): the classifier
    cannot tell them apart, so which images evaluate scores changes every metric."""
    size, suffix = like
    for folder in folders:
        (root / folder / "nested").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / folder / "a.jpg")
        for n in range(OOD_PER_FOLDER - 1):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / folder / "nested" / f"b{n}{suffix}")


def fake_cifar100(root: Path) -> None:
    """CIFAR-100's python release (torchvision's format), SVHN's test .mat and the OOD folders."""
    import scipy.io

    from ncis.datasets.cifar100 import CIFAR100_LABELS, OOD_FOLDERS

    rng = np.random.default_rng(0)
    cifar = root / "cifar-100-python"
    cifar.mkdir(parents=True)
    for split, per_class in (("train", PER_CLASS), ("test", 1)):
        labels = np.repeat(np.arange(100), per_class)
        entry = {"data": rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8), "fine_labels": labels.tolist()}
        # the release's pickles: protocol 2, numpy 1's name for the array constructor
        pickled = pickle.dumps(entry, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (cifar / split).write_bytes(pickled)
    (cifar / "meta").write_bytes(pickle.dumps({"fine_label_names": list(CIFAR100_LABELS)}, protocol=2))
    (root / "svhn").mkdir()
    svhn = {"X": rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8), "y": np.array([[1], [2], [10], [3]])}
    scipy.io.savemat(root / "svhn" / "test_32x32.mat", svhn)
    _ood_folders(root, list(OOD_FOLDERS.values()), rng, ((32, 32), ".png"))


def fake_imagenet100(root: Path) -> None:
    """ImageNet-1k class folders for the 100 classes (train and val) and the OOD folders."""
    from ncis.datasets.imagenet100 import CLASSES, OOD_FOLDERS

    rng = np.random.default_rng(0)
    for split, count in (("train", PER_CLASS), ("val", 1)):
        for wnid in CLASSES:
            (root / "imagenet" / split / wnid).mkdir(parents=True)
            for n in range(count):
                Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "imagenet" / split / wnid / f"{n}.JPEG")
    _ood_folders(root, list(OOD_FOLDERS.values()), rng, ((30, 40), ".JPEG"))


@pytest.mark.slow
def test_ncis_run_with_the_cifar100_config_goes_from_raw_data_to_metrics(tmp_path, tiny_sd_dir, monkeypatch):
    import torchvision.datasets.svhn
    import torchvision.datasets.utils

    from ncis.cli import main

    # The fake files cannot match the release's md5 sums checked before reading.
    monkeypatch.setattr(torchvision.datasets.utils, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *args, **kwargs: True)
    fake_cifar100(tmp_path / "datasets")
    assert main(_tiny_run(tmp_path, tiny_sd_dir, tmp_path / "datasets", "configs/cifar100.yaml")) == 0
    _check_every_boundary(tmp_path / "outputs", "cifar100", 32, {"svhn", "places365", "lsun", "isun", "textures"}, 32, tiny_sd_dir)


@pytest.mark.slow
def test_ncis_run_with_the_imagenet100_config_goes_from_raw_data_to_metrics(tmp_path, tiny_sd_dir, monkeypatch):
    from safetensors.torch import load_file

    from ncis import checkpoints, embed, train_classifier
    from ncis.cli import main

    read, inits = [], []
    monkeypatch.setattr(embed, "image_folder", lambda folder, **kw: read.append(Path(folder)) or image_folder(folder, **kw))
    real_read_init = train_classifier.read_init
    monkeypatch.setattr(train_classifier, "read_init", lambda folder, *a: inits.append(Path(folder)) or real_read_init(folder, *a))
    fake_imagenet100(tmp_path / "datasets")
    # The config's two phases, each cut to one epoch: no classifier.init is set here.
    run = _tiny_run(tmp_path, tiny_sd_dir, tmp_path / "datasets", "configs/imagenet100.yaml", "pretrain.epochs=1", "pretrain.batch_size=64")
    assert main(run) == 0
    outputs = tmp_path / "outputs"
    _check_every_boundary(outputs, "imagenet100", 224, {"inaturalist", "sun", "places", "textures"}, 32, tiny_sd_dir)
    # embed inverts the original JPEGs (the paper's 512 view), not the stored 224 crops
    assert read == [outputs / "data" / "train_originals"]
    # Phase 1 (pretrain-classifier) wrote a cross-entropy classifier; phase 2 started from it alone.
    phase_one = json.loads((outputs / "pretrained_classifier" / "config.json").read_text())
    assert phase_one["outliers"] == "none" and phase_one["energy_head"] is None and phase_one["epochs"] == 1
    assert inits == [outputs / "pretrained_classifier"]
    phase_two = json.loads((outputs / "classifier" / "config.json").read_text())
    assert phase_two["outliers"] == "ncis" and phase_two["energy_head"]["mode"] == "mlp"
    assert (phase_two["mean"], phase_two["std"]) == (phase_one["mean"], phase_one["std"])  # kept from the init
    first = load_file(str(outputs / "pretrained_classifier" / "model.safetensors"))
    second = load_file(str(outputs / "classifier" / "model.safetensors"))
    assert first.keys() == second.keys() and any(not torch.equal(first[k], second[k]) for k in first)  # then trained on
    assert checkpoints.saved(outputs / "pretrained_classifier_checkpoints", "epoch")  # its own resume state
