"""`ncis import-classifier`: the paper's released checkpoints become an ncis classifier folder that
computes the paper's function, and nothing else gets in.

The reference model below is written here from reading LarsDoorenbos/NCIS@42fb174 scripts/resnet.py
(BasicBlock :13-40, ResNet :76-126, resnet34 :183-184, ResNet_Model :229-248), independently of
ncis's torchvision-based `resnet34`: its state dict has the released files' key names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ncis.classifiers import load_classifier
from ncis.cli import main as cli
from ncis.datasets import get_benchmark, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"cifar100": ROOT / "configs" / "cifar100.yaml", "imagenet100": ROOT / "configs" / "imagenet100.yaml"}
# The paper's evaluation transforms, read off its scripts, not off ncis: a wrong constant in ncis fails the logits test.
NORMALISATION = {
    "cifar100": ([x / 255 for x in (125.3, 123.0, 113.9)], [x / 255 for x in (63.0, 62.1, 66.7)]),  # scripts/test_ood_cifar100.py:50-51
    "imagenet100": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),  # scripts/test_ood_in100.py:49-50
}


# ---------------------------------------------------------------- the paper's ResNet_Model('resnet34')


class RefBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        projection = stride != 1 or c_in != c_out
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)) if projection else nn.Sequential()

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class RefEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # 3x3 stride-1 stem, no max-pool
        self.bn1 = nn.BatchNorm2d(64)
        c_in = 64
        for index, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layers = []
            for n in range(blocks):
                layers.append(RefBlock(c_in, width, stride if n == 0 else 1))
                c_in = width
            setattr(self, f"layer{index}", nn.Sequential(*layers))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


class RefModel(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.encoder = RefEncoder()
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(self.encoder(x))


def reference(num_classes: int = 100, seed: int = 0) -> RefModel:
    """Random weights and random BatchNorm statistics (a fresh BN's 0/1 would hide a swapped buffer), in eval mode."""
    torch.manual_seed(seed)
    model = RefModel(num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
        # A random deep net's logits hardly move with its input (global pooling averages noise out):
        # scaled up, a wrong constant or a swapped weight moves them by far more than the tolerance.
        model.fc.weight.mul_(100)
    return model.eval()


def save_checkpoint(model: nn.Module, path: Path, data_parallel: bool) -> Path:
    state = model.state_dict()
    torch.save({f"module.{k}" if data_parallel else k: v for k, v in state.items()}, path)
    return path


def import_args(checkpoint: Path, benchmark: str, outputs: Path, *more: str) -> list[str]:
    return ["import-classifier", str(checkpoint), "--params", str(CONFIGS[benchmark]), "--set", f"outputs={outputs}", *more]


@pytest.fixture(scope="module")
def cifar_checkpoint(tmp_path_factory) -> tuple[RefModel, Path]:
    model = reference()
    return model, save_checkpoint(model, tmp_path_factory.mktemp("released") / "cifar100_released.pt", data_parallel=True)


# ---------------------------------------------------------------- same function


@pytest.mark.parametrize(
    "benchmark, data_parallel",
    [("cifar100", True), ("cifar100", False), ("imagenet100", False)],  # the ImageNet-100 energy files lack `module.`
)
def test_an_imported_checkpoint_gives_the_reference_logits(benchmark, data_parallel, cifar_checkpoint, tmp_path):
    if benchmark == "cifar100" and data_parallel:
        model, checkpoint = cifar_checkpoint
    else:
        model = reference(seed=1)
        checkpoint = save_checkpoint(model, tmp_path / f"{benchmark}.pt", data_parallel)
    assert cli(import_args(checkpoint, benchmark, tmp_path / "outputs", "--no-tracking")) == 0

    imported, config = load_classifier(tmp_path / "outputs" / "classifier")
    spec = get_benchmark(benchmark)
    mean, std = NORMALISATION[benchmark]
    assert config["source"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert (config["num_classes"], config["channels"], config["image_size"]) == (100, 3, spec.image_size)
    images = torch.rand(2, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected, got = model(normalised), imported(images)
    assert (expected[0] - expected[1]).abs().max() > 0.1  # logits that tell images apart
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- refusals, one line each


class Payload:
    """Unpickling it opens (creates) `marker`: what a hostile checkpoint could do with any callable."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _refused(capsys, args: list[str], *words: str) -> str:
    assert cli(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ncis: error: "), lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    checkpoint = tmp_path / "hostile.pt"
    torch.save({"fc.weight": torch.zeros(100, 512), "extra": Payload(marker)}, checkpoint)
    _refused(capsys, import_args(checkpoint, "cifar100", tmp_path / "outputs", "--no-tracking"), "hostile.pt", "nothing in it was run")
    assert not marker.exists() and not (tmp_path / "outputs" / "classifier").exists()
    torch.load(checkpoint, weights_only=False)  # the control: a full unpickle does run it
    assert marker.exists()


def _edited(state: dict, path: Path, drop: str | None = None, add: dict | None = None) -> Path:
    state = {k: v for k, v in state.items() if k != drop} | (add or {})
    torch.save(state, path)
    return path


def test_wrong_files_are_refused_in_one_line_and_keep_the_previous_classifier(cifar_checkpoint, tmp_path, capsys):
    model, good = cifar_checkpoint
    outputs = tmp_path / "outputs"
    assert cli(import_args(good, "cifar100", outputs, "--no-tracking")) == 0
    before = (outputs / "classifier" / "model.safetensors").read_bytes()
    state = model.state_dict()
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    shortcut = "encoder.layer2.0.shortcut.0.weight"
    cases = [
        (tmp_path / "absent.pt", ("no such checkpoint file",)),
        (text, ("notes.pt", "not a")),
        (_edited(state, tmp_path / "ten.pt", add={"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}),
         ("'fc.weight'", "[10, 512]", "[100, 512]", "number of classes")),
        (_edited(state, tmp_path / "missing.pt", drop=shortcut), ("missing key", "backbone.layer2.0.downsample.0.weight")),
        (_edited(state, tmp_path / "unexpected.pt", add={"encoder.layer5.0.conv1.weight": torch.zeros(1)}), ("unexpected key", "encoder.layer5")),
        (_edited({"net": 1}, tmp_path / "not_tensors.pt"), ("not the state dict",)),
    ]  # fmt: skip
    for checkpoint, words in cases:
        _refused(capsys, import_args(checkpoint, "cifar100", outputs, "--no-tracking"), *words)
    digits = ["import-classifier", str(good), "--params", str(ROOT / "params.yaml"), "--set", f"outputs={outputs}", "--no-tracking"]
    _refused(capsys, digits, "not 'digits'")
    assert (outputs / "classifier" / "model.safetensors").read_bytes() == before
    assert not [p.name for p in outputs.iterdir() if p.name.startswith(".classifier")]  # no temporaries left


def test_energy_head_weights_are_noted_and_left_out_and_bn_counters_may_be_absent(cifar_checkpoint, tmp_path, capsys):
    model, _ = cifar_checkpoint
    head = {"logistic_regression.0.weight": torch.ones(2, 1), "logistic_regression.0.bias": torch.zeros(2)}
    # Files from PyTorch before 0.4.1 have no num_batches_tracked; an eval-mode forward never reads it.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    checkpoint = _edited(state, tmp_path / "with_head.pt", add=head)
    assert cli(import_args(checkpoint, "cifar100", tmp_path / "outputs", "--no-tracking")) == 0
    assert "logistic_regression.0.weight" in capsys.readouterr().out
    assert json.loads((tmp_path / "outputs" / "classifier" / "config.json").read_text())["energy_head"] is None
    imported, _ = load_classifier(tmp_path / "outputs" / "classifier")
    assert torch.equal(imported.fc.weight, model.fc.weight)


# ---------------------------------------------------------------- then evaluate, and MLflow


def test_evaluate_runs_unchanged_on_an_imported_cifar100_classifier(cifar_checkpoint, tmp_path):
    model, checkpoint = cifar_checkpoint
    outputs = tmp_path / "outputs"
    assert cli(import_args(checkpoint, "cifar100", outputs, "--no-tracking")) == 0
    # What `prepare` writes (ImageFolders of 32x32 PNGs), filled here with noise: 10 ID test images, 5 per OOD set.
    rng = np.random.default_rng(0)
    id_images, id_labels = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), np.arange(10)
    write_image_folder(outputs / "data" / "test", id_images, id_labels)
    for name in get_benchmark("cifar100").ood_sets:
        write_image_folder(outputs / "data" / "ood" / name, rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), np.zeros(5, int))
    args = ["evaluate", "--no-tracking", "--params", str(CONFIGS["cifar100"]), "--set", f"outputs={outputs}", "--set", "evaluate.batch_size=16"]
    assert cli(args) == 0
    metrics = json.loads((outputs / "metrics.json").read_text())
    assert set(metrics["ood"]) == set(get_benchmark("cifar100").ood_sets)
    # ID accuracy as the reference model scores the same images (PNG round-trips uint8 exactly).
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION["cifar100"])
    images = torch.from_numpy(id_images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        predicted = model((images - mean) / std).argmax(1).numpy()
    assert metrics["id_accuracy"] == pytest.approx(float(np.mean(predicted == id_labels)))


def test_the_import_is_an_mlflow_run_tagged_with_the_checkpoint(cifar_checkpoint, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    model, checkpoint = cifar_checkpoint
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "cifar100-import")
    monkeypatch.chdir(tmp_path)  # the store's artifacts go to ./mlruns
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    assert cli(import_args(checkpoint, "cifar100", tmp_path / "outputs")) == 0
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("cifar100-import").experiment_id])
    assert run.info.run_name == "cifar100-released-cifar100_released/import-classifier"
    assert run.data.tags["ncis.stage"] == "import-classifier"
    assert run.data.tags["checkpoint_file"] == "cifar100_released.pt"
    assert run.data.tags["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert {a.path for a in client.list_artifacts(run.info.run_id, "classifier")} == {"classifier/config.json", "classifier/model.safetensors"}

    # In the registry under the alias `paper`: the reference model's logits from [0, 1] images, without ncis.
    version = client.get_model_version_by_alias("ncis-cifar100-classifier", "paper")
    assert version.run_id == run.info.run_id and version.tags["checkpoint_sha256"] == run.data.tags["checkpoint_sha256"]
    loaded = mlflow.pytorch.load_model("models:/ncis-cifar100-classifier@paper")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION["cifar100"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model((images - mean) / std), rtol=1e-4, atol=1e-4)


def test_an_imported_classifier_is_evaluated_under_openood_too(cifar_checkpoint, tmp_path):
    """The released CIFAR-100 model on OpenOOD v1.5's lists (fake, in its layout): ID accuracy as the
    reference model scores the same images with OpenOOD's preprocessing, written out in the test."""
    from test_openood import by_hand, write_openood

    model, checkpoint = cifar_checkpoint
    outputs, root = tmp_path / "outputs", tmp_path / "openood"
    assert cli(import_args(checkpoint, "cifar100", outputs, "--no-tracking")) == 0
    images = write_openood(root)
    protocol = ["--set", "evaluate.protocol=openood_v1.5", "--set", f"evaluate.openood_root={root}", "--set", "evaluate.batch_size=16"]
    assert cli(["evaluate", "--no-tracking", "--params", str(CONFIGS["cifar100"]), "--set", f"outputs={outputs}", *protocol]) == 0
    report = json.loads((outputs / "metrics_openood_v1.5.json").read_text())
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION["cifar100"])
    _, logits = by_hand(lambda pixels: model((pixels - mean) / std), images["test_cifar100"])
    labels = np.arange(len(images["test_cifar100"])) % 10  # write_openood's labels
    assert report["id_accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == labels)))
    assert (outputs / "openood_v1.5.csv").exists() and not (outputs / "metrics.json").exists()
