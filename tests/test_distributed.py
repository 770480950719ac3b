"""torchrun: sharded `embed` and `synthesize` write exactly what one process writes (gloo, 2 CPU ranks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest

from ncis import distributed
from ncis.cli import main as cli_main
from ncis.config import load_params
from ncis.datasets import get_benchmark, write_image_folder
from ncis.errors import UserError
from ncis.io import save_arrays
from ncis.layout import layout_for

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], processes: int = 2, timeout: float = 300, program: tuple[str, ...] = ("-m", "ncis.cli")) -> subprocess.CompletedProcess:
    """`program` (`ncis`, or a script and its own arguments) on `processes` torchrun ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", *program, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _settings(outputs: Path, model: Path, *more: str) -> list[str]:
    return [f"outputs={outputs}", f"diffusion.model={model}", "device=cpu", *more]


def _cli_args(command: str, settings: list[str]) -> list[str]:
    return [command, "--no-tracking", *[arg for s in settings for arg in ("--set", s)]]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_process(args: list[str]) -> int:
    """`ncis` in this process on one intra-op thread, like each torchrun rank (OMP_NUM_THREADS=1):
    a CPU reduction's float rounding depends on the thread count, not on the sharding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli_main(args)
    finally:
        torch.set_num_threads(threads)


def _embed_inputs(outputs: Path, model: Path) -> list[str]:
    settings = _settings(outputs, model, "embed.steps=2", "embed.noise_draws=4", "embed.chunk_size=5", "embed.batch_size=3")
    rng = np.random.default_rng(0)
    write_image_folder(layout_for(load_params(overrides=settings)).id_train, rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8), np.arange(12) % 3)
    return settings


def _single_and_sharded(stage: str, make_inputs, tmp_path: Path, model: Path):
    """`stage` on the same inputs in one process and on 2 torchrun ranks; (single, sharded) layouts."""
    single = make_inputs(tmp_path / "single", model)
    sharded = make_inputs(tmp_path / "sharded", model)
    assert _one_process(_cli_args(stage, single)) == 0
    done = torchrun(_cli_args(stage, sharded))
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(layout_for(load_params(overrides=s)) for s in (single, sharded))


@pytest.mark.slow  # two torchrun processes: ~20 s
def test_sharded_embed_writes_the_single_process_embeddings(tmp_path, untrained_pipeline_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single_layout, sharded_layout = _single_and_sharded("embed", _embed_inputs, tmp_path, untrained_pipeline_dir)
    assert sharded_layout.embeddings.read_bytes() == single_layout.embeddings.read_bytes()
    # Chunks and summary too; the work key names each run's own image folder.
    single_files, sharded_files = _files(single_layout.embed_dir), _files(sharded_layout.embed_dir)
    assert single_files.pop("chunks/work-key.txt") != sharded_files.pop("chunks/work-key.txt")
    assert sharded_files == single_files and len(single_files) == 5
    assert not (tmp_path / "sharded" / ".ncis.lock").exists()  # released by rank 0 at the end


def _synthesize_inputs(outputs: Path, model: Path) -> list[str]:
    settings = _settings(outputs, model, "synthesize.steps=3", "synthesize.batch_size=7", "synthesize.control_per_class=2")
    layout = layout_for(load_params(overrides=settings))
    rng = np.random.default_rng(0)
    write_image_folder(layout.id_train, rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), np.arange(40) % 10)
    save_arrays(layout.embeddings, embeddings=rng.normal(size=(40, 16)).astype(np.float32), labels=np.arange(40) % 10)
    save_arrays(layout.outliers, outliers=rng.normal(size=(10, 3, 16)).astype(np.float32), labels=np.arange(10))
    return settings


@pytest.mark.slow  # two torchrun processes: ~20 s
def test_sharded_synthesize_writes_the_single_process_images(tmp_path, untrained_pipeline_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single_layout, sharded_layout = _single_and_sharded("synthesize", _synthesize_inputs, tmp_path, untrained_pipeline_dir)
    images = _files(single_layout.synthetic_images)
    assert len(images) == 30
    assert _files(sharded_layout.synthetic_images) == images
    assert _files(sharded_layout.synth_dir) == _files(single_layout.synth_dir)  # preview and diagnostics too


@pytest.mark.slow  # two torchrun processes: ~20 s
def test_a_job_whose_outputs_are_locked_fails_on_every_rank_with_one_line(tmp_path, untrained_pipeline_dir):
    from ncis.lock import outputs_lock

    settings = _embed_inputs(tmp_path, untrained_pipeline_dir)
    with outputs_lock(tmp_path, command="ncis other"):
        done = torchrun(_cli_args("embed", settings))
    assert done.returncode != 0
    # Each rank says it in one line (torchrun itself then reports the failed workers).
    assert done.stderr.count("ncis: error: outputs folder") == 2 and "in use by `ncis other`" in done.stderr
    assert 'ncis/cli.py", line' not in done.stderr


@pytest.mark.slow  # two torchrun processes: ~10 s
def test_a_rank_that_waits_past_the_timeout_says_which_parameter_to_raise(tmp_path):
    # prepare runs on rank 0 alone, far longer than 1.2 s, while rank 1 waits at the stage's end.
    settings = [f"outputs={tmp_path}", "device=cpu", "process_group_timeout_minutes=0.02", "diffusion.train_steps=30"]
    done = torchrun(_cli_args("prepare", settings))
    assert done.returncode != 0
    assert "ncis: error: rank 1 waited more than 0.02 min for the other ranks" in done.stderr
    assert "--set process_group_timeout_minutes=0.08" in done.stderr
    assert 'ncis/cli.py", line' not in done.stderr


def test_one_process_helpers_are_no_ops():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard([3, 4, 5]) == [3, 4, 5]
    assert distributed.gather("x") == ["x"] and distributed.broadcast(7) == 7
    distributed.barrier()


def test_held_by_main_passes_the_refusal_on(tmp_path):
    def refuse():
        raise UserError("outputs folder busy")

    with pytest.raises(UserError, match="busy"):
        with distributed.held_by_main(refuse):
            pass


# `ncis` on one torchrun rank that also saves what this rank holds: after every epoch its
# classifier's and energy head's parameters and its own stats, and the head's gradient of its
# first step before the ranks average it. Only rank 0 writes ncis's outputs, so the other ranks'
# weights are seen nowhere else.
RANK_WEIGHTS = """
import json, sys
from pathlib import Path

from safetensors.torch import save_file

from ncis import distributed, train_classifier
from ncis.cli import main

folder = Path(sys.argv[1])
train_epoch, average_gradients = train_classifier.train_epoch, distributed.average_gradients


def keeping(model, head, *args):
    stats = train_epoch(model, head, *args)
    name = f"rank{distributed.rank()}-epoch{args[-1]}"
    model = getattr(model, "module", model)  # inside DistributedDataParallel
    tensors = {f"model/{k}": p for k, p in model.named_parameters()} | {f"head/{k}": p for k, p in head.named_parameters()}
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(stats))
    return stats


def averaging(parameters):
    parameters = list(parameters)
    first = folder / f"rank{distributed.rank()}-local-head-gradient.safetensors"
    if not first.exists():
        save_file({str(i): p.grad.clone() for i, p in enumerate(parameters)}, str(first))
    average_gradients(parameters)


train_classifier.train_epoch, distributed.average_gradients = keeping, averaging
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow  # two torchrun processes: ~20 s
def test_ddp_training_shares_the_data_and_writes_one_classifier(tmp_path):
    import json

    from safetensors.torch import load_file
    from test_classifier import make_tiny_data

    from ncis.classifiers import load_classifier

    make_tiny_data(tmp_path)  # 40 ID images, outliers capped at 10 below
    settings = [f"outputs={tmp_path}", "device=cpu", "classifier.arch=small_cnn", "classifier.epochs=2", "classifier.batch_size=8",
                "classifier.outlier_batch_size=4", "classifier.max_outliers=10"]
    script, kept = tmp_path / "rank_weights.py", tmp_path / "kept"
    script.write_text(RANK_WEIGHTS)
    kept.mkdir()
    done = torchrun(_cli_args("train-classifier", settings), program=(str(script), str(kept)))
    assert done.returncode == 0, done.stderr[-3000:]
    layout = layout_for(load_params(overrides=settings))
    assert sorted(p.name for p in layout.classifier_checkpoints.iterdir()) == ["epoch_0001", "epoch_0002", "work-key.txt"]
    # Each of the 2 ranks read 20 of the 40 ID images: 2 full batches of 8 per epoch (one process: 5).
    assert json.loads((layout.classifier_checkpoints / "epoch_0002" / "state.json").read_text())["steps_per_epoch"] == 2
    model, config = load_classifier(layout.classifier)
    assert config["epochs"] == 2 and model(torch.rand(3, 1, 8, 8)).shape == (3, 10)

    # After every epoch both ranks hold the same classifier AND energy head, bit for bit (DDP
    # averages the classifier's gradients, distributed.average_gradients the head's). BatchNorm's
    # running statistics are per rank (docs/scaling.md): parameters only.
    for epoch in (1, 2):
        weights = [load_file(str(kept / f"rank{r}-epoch{epoch}.safetensors")) for r in (0, 1)]
        assert weights[0].keys() == weights[1].keys() and {"head/raw_weight", "head/bias"} <= weights[0].keys()
        differing = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
        assert differing == [], f"epoch {epoch}: the ranks' weights diverged in {differing}"
    assert float(weights[0]["head/raw_weight"]) != 1.0  # the head trained (it starts at w = 1)
    # ... though they trained on different shards: their own losses, their own head gradients,
    # which unaveraged would have moved the heads apart.
    stats = [json.loads((kept / f"rank{r}-epoch2.json").read_text()) for r in (0, 1)]
    assert stats[0]["train/loss"] != stats[1]["train/loss"]
    local = [load_file(str(kept / f"rank{r}-local-head-gradient.safetensors")) for r in (0, 1)]
    assert all(not torch.equal(local[0][k], local[1][k]) for k in local[0])
    # What rank 0 saved is what every rank holds.
    saved = model.state_dict()
    assert all(torch.equal(saved[k.removeprefix("model/")], v) for k, v in weights[0].items() if k.startswith("model/"))
    checkpoint = load_file(str(layout.classifier_checkpoints / "epoch_0002" / "state.safetensors"))
    assert all(torch.equal(checkpoint[k], v) for k, v in weights[1].items() if k.startswith("head/"))


# What `ncis run` writes up to synthesize: one process's bits whatever the number of ranks
# (docs/scaling.md: sharded embed and synthesize equal one process; the other stages run on rank 0).
# train-classifier is DDP (a batch per rank: another schedule), so it and evaluate are not compared.
UP_TO_SYNTHESIZE = ("prepare", "embed", "train-cvpn", "sample", "synthesize")
ONE_PROCESS_OUTPUTS = ("data/", "diffusion/", "embed/", "cvpn/", "sample/", "synthesize/")


@pytest.mark.slow  # a whole tiny pipeline on two torchrun processes, and its first stages in one: ~25 s
def test_a_whole_ncis_run_under_torchrun_writes_every_output_once(tmp_path, monkeypatch):
    import json

    from conftest import TINY_PIPELINE

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    settings = ["device=cpu", *TINY_PIPELINE, "cvpn.hidden=16", "classifier.max_outliers=100",
                # Work for both ranks: 6 embed chunks, 8 synthesize batches (at the defaults rank 0 does it all).
                "embed.chunk_size=10", "embed.batch_size=5", "synthesize.batch_size=4"]
    done = torchrun(_cli_args("run", [f"outputs={sharded}", *settings]), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in UP_TO_SYNTHESIZE:
        assert _one_process(_cli_args(stage, [f"outputs={single}", *settings])) == 0
    # Byte for byte, but the embed chunks' work key, which names each run's own image folder.
    expected, found = ({k: v for k, v in _files(root).items() if k.startswith(ONE_PROCESS_OUTPUTS)} for root in (single, sharded))
    assert expected.pop("embed/chunks/work-key.txt") != found.pop("embed/chunks/work-key.txt")
    assert found.keys() == expected.keys() and len(expected) > 100  # the images of every folder, the models, the arrays
    differing = [k for k in expected if found[k] != expected[k]]
    assert differing == [], f"not what one process writes: {differing}"

    layout = layout_for(load_params(overrides=[f"outputs={sharded}"]))
    metrics = json.loads(layout.metrics.read_text())
    assert list(metrics["ood"]) == list(get_benchmark("digits").ood_sets)  # near, far, then stats
    assert 0 <= metrics["id_accuracy"] <= 1 and 0 <= metrics["average"]["auroc"] <= 1
    for output in (layout.tiny_diffusion, layout.embeddings, layout.cvpn, layout.outliers, layout.synthetic_images, layout.classifier):
        assert output.exists(), output
    # Resume state that a finished stage deletes is gone; no rank left a temporary or the lock.
    for state in (layout.diffusion_checkpoints, layout.cvpn_checkpoints, layout.synthesize_batches):
        assert not state.exists(), state
    assert not [p for p in sharded.rglob("*") if ".ncis-tmp-" in p.name or p.name == ".ncis.lock"]
    # Every stage ran once: rank 0 alone prints a stage's closing line.
    assert done.stdout.count("synthesize: ") >= 1 and done.stdout.count("embeddings of dimension") == 1, done.stdout[-2000:]


def _sd_synthesize_inputs(outputs: Path, model: Path) -> list[str]:
    """CIFAR-100 on the tiny Stable Diffusion: one outlier and one control image per class, rendered
    in latent space and decoded by the VAE at the model's 64 pixels (saved unresized)."""
    settings = _settings(
        outputs, model, "benchmark=cifar100", f"data.root={outputs / 'datasets'}", f"evaluate.openood_root={outputs / 'openood'}", "synthesize.steps=2",
        "synthesize.batch_size=7", "synthesize.control_per_class=1", "synthesize.save_size=64", "synthesize.preview_per_class=1",
    )  # fmt: skip
    layout = layout_for(load_params(overrides=settings))
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 100
    write_image_folder(layout.id_train, rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), labels)
    save_arrays(layout.embeddings, embeddings=rng.normal(size=(200, 32)).astype(np.float32), labels=labels)
    save_arrays(layout.outliers, outliers=rng.normal(size=(100, 1, 32)).astype(np.float32), labels=np.arange(100))
    return settings


@pytest.mark.slow  # two torchrun processes: ~30 s
def test_sharded_synthesize_through_a_vae_writes_the_single_process_images(tmp_path, tiny_sd_dir, monkeypatch):
    from ncis.diffusion import load_pipeline

    assert load_pipeline(tiny_sd_dir).vae is not None  # latents decoded by the VAE, as Stable Diffusion's
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single_layout, sharded_layout = _single_and_sharded("synthesize", _sd_synthesize_inputs, tmp_path, tiny_sd_dir)
    images = _files(single_layout.synthetic_images)
    assert len(images) == 100
    assert _files(sharded_layout.synthetic_images) == images
    assert _files(sharded_layout.synth_dir) == _files(single_layout.synth_dir)  # preview and diagnostics (control pool) too
