"""Shared fixtures. Append new ones; several test files rely on these."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SERVER_START_TIMEOUT_S = 180  # a cold `mlflow server` takes ~10 s alone, far longer on a loaded machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` (SQLite backend, proxied local artifact store) for the session; yields its URI.

    Use the `tracking_uri` fixture to point a test's runs at it.
    """
    import requests

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
        # The background job runner is not needed for tracking; it only costs start-up time.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # its own process group: the uvicorn child goes down with it
    )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited ({server.returncode}):\n{_tail(root / 'server.log')}")
            try:
                if requests.get(uri + "/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up after {SERVER_START_TIMEOUT_S} s:\n{_tail(root / 'server.log')}")
            time.sleep(0.2)
        yield uri
    finally:
        _stop(server)
        log.close()


@pytest.fixture
def tracking_uri(mlflow_server, monkeypatch) -> str:
    """Point MLflow at the session's server for one test (and forget any project run id)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    return mlflow_server


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever of it is left (bounded wait)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- the whole pipeline in seconds ------------------------------------------------------------

# Every stage cut to seconds on digits; the same keys a user would --set (test_pipeline, faults).
TINY_PIPELINE = [
    "diffusion.train_steps=30",
    "diffusion.unet_channels=[8, 16]",
    "diffusion.text_width=16",
    "data.ood_size=40",
    "embed.image_limit=60",
    "embed.steps=1",
    "embed.noise_draws=2",
    "cvpn.epochs=2",
    "sample.candidates=40",
    "sample.keep=2",
    "sample.rounds=2",
    "synthesize.steps=3",
    "synthesize.control_per_class=1",
    "classifier.epochs=1",
]


# --- tiny diffusion models ---------------------------------------------------------------------

TINY_MODEL = [
    "diffusion.unet_channels=[8, 16]",
    "diffusion.text_width=16",
]


@pytest.fixture(scope="session")
def untrained_pipeline_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny pipeline saved in diffusers' layout (plumbing tests only)."""
    from ncis.config import load_params
    from ncis.datasets import get_benchmark
    from ncis.tiny_diffusion import build_pipeline

    folder = tmp_path_factory.mktemp("untrained") / "diffusion"
    params = load_params(overrides=TINY_MODEL)
    names = list(get_benchmark("digits").class_names)
    pipe = build_pipeline(params, names, [params.embed.prompt, params.synthesize.prompt], folder)
    pipe.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    """The published digits model and the training images it was trained on: (params, layout).

    Read through DVC from dvc.lock's outputs in the in-repo remote (dvc-store/), so tests hold the
    model users `dvc pull` to params.yaml's quality bar without training it again;
    tests/test_dvc.py's "dvc repro runs nothing" test keeps that model current with the code.
    """
    from dvc.api import DVCFileSystem

    from ncis.config import load_params
    from ncis.layout import layout_for

    root = tmp_path_factory.mktemp("trained")
    params = load_params(overrides=[f"outputs={root}", "tracking.enabled=false"])
    layout, in_repo = layout_for(params), layout_for(load_params())  # params.yaml's outputs: dvc.yaml's paths
    published = DVCFileSystem(str(Path(__file__).parents[1]))
    for folder in ("tiny_diffusion", "id_train"):
        published.get(getattr(in_repo, folder).as_posix(), str(getattr(layout, folder)), recursive=True)
    return params, layout


# --- the MLflow UI in a real browser (tests/test_tracking.py) ---------------------------------


def pytest_addoption(parser):
    parser.addoption(
        "--ui-screenshots",
        default=None,
        metavar="DIR",
        help="also save the MLflow UI screenshots that the browser test takes to DIR (docs/ regenerates the docs' images)",
    )


@pytest.fixture
def chromium() -> str:
    """Debian's headless-capable `chromium` (.ci/run installs it); the test is skipped without it."""
    import shutil

    path = shutil.which("chromium")
    if path is None:
        pytest.skip("needs Debian's chromium: apt-get install -y chromium (.ci/run does)")
    return path


# --- two workers (`make test`: pytest-xdist, one test file per worker at a time) ---------------


def pytest_configure(config):
    # On CI's two cores, two workers computing on two threads each would only contend: each worker,
    # and every process its tests start, computes on one.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# --- the fast subset (`pytest -m "not slow"`) ----------------------------------------------------

# Fixtures that alone make a test slow: a real `mlflow server` (~10 s to start, far longer on a
# busy machine) and a trained tiny diffusion model (tens of seconds). A test that uses one, even
# through another fixture such as `tracking_uri`, is marked slow here, so no file has to remember.
SLOW_FIXTURES = {"mlflow_server", "trained_digits"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# --- a tiny Stable Diffusion (latent space, with a VAE) ----------------------------------------

TINY_SD_UNET_SIDE = 8  # latent side; images are 8x larger (the VAE has four levels, as SD's)
TINY_SD_VAE_SCALING = 0.5  # not SD's 0.18215: a hard-coded factor would show


# Words the tiny tokenizer splits, as SD's CLIP BPE splits rare words (docs/paper-fidelity.md:
# `cockroach` = co|ck|roach, `agama` = ag|ama): token names whose FIRST token is the one inverted
# and swapped, and a prompt word ahead of the swapped token (`aquarium` fish), which moves it.
TINY_SD_SPLIT_WORDS = ("cockroach", "agama", "aquarium")


def _tiny_clip_tokenizer(words: list[str], folder: Path, max_length: int):
    """A CLIP BPE tokenizer whose merges, learned by `tokenizers` on `words`, make each word one
    token, except TINY_SD_SPLIT_WORDS: their last merge is left out, so each is two tokens."""
    import json

    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTokenizer

    from ncis.tiny_diffusion import BOS, EOS

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.train_from_iterator([words], trainers.BpeTrainer(vocab_size=100_000, end_of_word_suffix="</w>", show_progress=False))
    learned = json.loads(bpe.to_str())["model"]
    vocab = dict(learned["vocab"])
    vocab.update({BOS: len(vocab), EOS: len(vocab) + 1})
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in learned["merges"]]
    whole = {word + "</w>" for word in TINY_SD_SPLIT_WORDS}
    merges = [merge for merge in merges if merge.replace(" ", "") not in whole]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length, pad_token=EOS)
    lengths = {w: len(tokenizer(w, add_special_tokens=False).input_ids) for w in words}
    assert {w for w, n in lengths.items() if n != 1} == set(TINY_SD_SPLIT_WORDS) & set(words)
    assert all(lengths[w] == 2 for w in TINY_SD_SPLIT_WORDS if w in lengths)
    return tokenizer


def build_tiny_stable_diffusion(folder: Path, class_names: list[str], templates: list[str]):
    """Stable Diffusion 1.x's components (AutoencoderKL, CLIP text encoder, cross-attention UNet,
    PNDM) at toy sizes, randomly initialised; the tokenizer knows the templates and class names."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ncis.tiny_diffusion import prompt_words

    max_length, width = 24, 32
    tokenizer = _tiny_clip_tokenizer(prompt_words(templates, class_names), folder / "tokenizer-source", max_length)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8), sample_size=8 * TINY_SD_UNET_SIDE, scaling_factor=TINY_SD_VAE_SCALING,
        )
        unet = UNet2DConditionModel(
            sample_size=TINY_SD_UNET_SIDE, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width, attention_head_dim=8,
            norm_num_groups=8,
        )
    # Stable Diffusion 1.4's scheduler settings (its scheduler/scheduler_config.json).
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder / "model"))
    return folder / "model"


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny Stable-Diffusion-shaped pipeline (with a VAE) in diffusers' folder layout, whose
    tokenizer covers the CIFAR-100 and ImageNet-100 class, token and prompt names and the paper's prompts."""
    from ncis.config import load_params
    from ncis.datasets import get_benchmark

    params = load_params(Path(__file__).parents[1] / "configs" / "cifar100.yaml")
    benchmarks = [get_benchmark(name) for name in ("cifar100", "imagenet100")]
    names = [name for b in benchmarks for name in (*b.class_names, *b.token_names, *b.prompt_names)]
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"), names, [params.embed.prompt, params.synthesize.prompt])
