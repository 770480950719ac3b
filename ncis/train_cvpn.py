"""Stage train-cvpn: learn class-wise invariants of the token embeddings with a cVPN.

Each batch takes two optimiser steps: (1) push the last k outputs (the invariants) to 0;
(2) zero them, map back and reconstruct the input, so the invariants carry no information
the class needs. With `reconstruction_detach` step (2) maps back step (1)'s output, detached,
so only the inverse pass learns from it (the paper's trainer, nl-invs/nl_invariants/
trainer.py:102-119); without, it recomputes the forward pass and trains both.
The checkpoint with the best held-out invariant MSE is kept (the training set's when
`holdout_fraction` is 0, as in the paper, which trains on all embeddings).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from ncis import checkpoints, tracking
from ncis.config import CvpnParams, Params
from ncis.cvpn import CVPN, count_invariants
from ncis.datasets import get_benchmark
from ncis.embeddings import load_embeddings
from ncis.errors import UserError
from ncis.io import save_weights
from ncis.layout import layout_for
from ncis.resume import claim, content_digest, work_key
from ncis.runtime import resolve_device, seed_everything, single_cpu_thread

EVAL_CHUNK = 8192  # rows per forward pass when evaluating, to bound memory on large embedding sets
# A checkpoint at most this often: a stopped run loses at most this much training, and digits'
# sub-second epochs do not pay a save each (every epoch cost its training 15-25%).
CHECKPOINT_SECONDS = 30.0


@dataclass
class FitResult:
    model: CVPN
    best_epoch: int
    best_invariant_mse: float  # on the held-out split (the training split when there is none)
    selected_on: str  # "holdout" | "train"
    train_index: np.ndarray
    holdout_index: np.ndarray
    history: list[dict] = field(default_factory=list)  # per epoch; epoch 0 = before training


def split_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.arange(len(labels))
    if fraction == 0:
        return index, index[:0]
    try:
        return train_test_split(index, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError:
        # Too few samples to put every class in both parts: a plain random split still selects fairly.
        return train_test_split(index, test_size=fraction, random_state=seed)


def reconstruction_loss(model: CVPN, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of x against its projection on the invariant manifold.

    Given `z` (the forward output of x), it is detached and only the inverse pass gets
    gradients; without, the forward pass is recomputed and trained too.
    """
    if z is None:
        return (model.project(x, y) - x).square().mean()
    kept = z.detach()[..., : -model.num_invariants]
    return (model.inverse(torch.cat([kept, torch.zeros_like(model.invariants(z))], dim=-1), y) - x).square().mean()


@torch.no_grad()
def evaluate(model: CVPN, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(invariant MSE, reconstruction MSE of the projection onto the invariant manifold)."""
    invariant, reconstruction = 0.0, 0.0
    for xs, ys in zip(x.split(EVAL_CHUNK), y.split(EVAL_CHUNK)):
        invariant += model.invariants(model(xs, ys)).square().sum().item() / model.num_invariants
        reconstruction += (model.project(xs, ys) - xs).square().sum().item() / model.dim
    return invariant / len(x), reconstruction / len(x)


def fit_cvpn(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    settings: CvpnParams,
    num_invariants: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    checkpoint_folder: Path | None = None,
) -> FitResult:
    """Train a cVPN with `num_invariants` invariants; keep the epoch with the lowest held-out invariant MSE.

    With `checkpoint_folder`, an epoch is checkpointed there every CHECKPOINT_SECONDS and a stopped
    run of the same work (settings, seed, data, device type) resumes after its last checkpointed
    epoch, to the same result."""
    device = torch.device(device)
    with single_cpu_thread(device):
        return _fit(embeddings, labels, num_classes, settings, num_invariants, seed, device, progress, checkpoint_folder)


def _work_key(embeddings, labels, settings, num_invariants, seed, device) -> str:
    data = content_digest(embeddings, labels)
    return work_key(
        {"cvpn": settings.model_dump(), "num_invariants": num_invariants, "seed": seed, "device": device.type, "data": data}
    )


def _fit(embeddings, labels, num_classes, settings, num_invariants, seed, device, progress, checkpoint_folder) -> FitResult:
    generator = torch.Generator().manual_seed(seed)
    train_index, holdout_index = split_holdout(labels, settings.holdout_fraction, seed)
    x = torch.as_tensor(embeddings, dtype=torch.float32, device=device)
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    x_train, y_train = x[train_index], y[train_index]
    selected_on = "holdout" if len(holdout_index) else "train"
    x_select, y_select = (x[holdout_index], y[holdout_index]) if len(holdout_index) else (x_train, y_train)

    torch.manual_seed(seed)  # initial weights
    model = CVPN(
        dim=x.shape[1],
        num_classes=num_classes,
        coupling_layers=settings.coupling_layers,
        hidden=settings.hidden,
        class_embedding=settings.class_embedding,
        num_invariants=num_invariants,
        activation=settings.activation,
        conditioning=settings.conditioning,
        init=settings.init,
        mean=x_train.mean(0).cpu() if settings.preprocess == "center" else None,
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    batches_per_epoch = -(-len(train_index) // settings.batch_size)
    scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0, end_factor=settings.lr_end_factor, total_iters=settings.epochs * batches_per_epoch
    )

    invariant_mse, reconstruction_mse = evaluate(model, x_select, y_select)
    history = [{"epoch": 0, f"{selected_on}_invariant_mse": invariant_mse, f"{selected_on}_reconstruction_mse": reconstruction_mse}]
    best = (invariant_mse, 0, {k: v.clone() for k, v in model.state_dict().items()})
    done = 0
    if checkpoint_folder is not None:
        key = _work_key(embeddings, labels, settings, num_invariants, seed, device)
        found = checkpoints.saved(checkpoint_folder, "epoch") if claim(checkpoint_folder, key) else []
        if found:
            done, path = found[-1]
            meta, kept = checkpoints.load(
                path, modules={"model": model}, optimizer=optimizer, scheduler=scheduler, generators={"shuffle": generator}, device=device
            )
            history = meta["history"]
            best = (meta["best_invariant_mse"], meta["best_epoch"], {k.split("/", 1)[1]: v for k, v in kept.items()})
            print(f"train-cvpn: resuming after epoch {done} from {path}")
    last_saved = time.monotonic()
    epochs = tqdm(range(done + 1, settings.epochs + 1), desc="train-cvpn", unit="epoch", disable=not progress, initial=done, total=settings.epochs)
    for epoch in epochs:
        model.train()
        invariant_sum, reconstruction_sum = 0.0, 0.0
        for batch in torch.randperm(len(train_index), generator=generator).to(device).split(settings.batch_size):
            xb, yb = x_train[batch], y_train[batch]

            z = model(xb, yb)
            invariant_loss = model.invariants(z).square().mean()
            optimizer.zero_grad()
            invariant_loss.backward()
            optimizer.step()

            rec_loss = reconstruction_loss(model, xb, yb, z if settings.reconstruction_detach else None)
            optimizer.zero_grad()
            rec_loss.backward()
            optimizer.step()
            scheduler.step()

            invariant_sum += invariant_loss.item() * len(batch)
            reconstruction_sum += rec_loss.item() * len(batch)

        model.eval()
        invariant_mse, reconstruction_mse = evaluate(model, x_select, y_select)
        metrics = {
            "invariant_loss": invariant_sum / len(train_index),
            "reconstruction_loss": reconstruction_sum / len(train_index),
            f"{selected_on}_invariant_mse": invariant_mse,
            f"{selected_on}_reconstruction_mse": reconstruction_mse,
            "lr": scheduler.get_last_lr()[0],
        }
        history.append({"epoch": epoch, **metrics})
        tracking.log_metrics(metrics, step=epoch)
        epochs.set_postfix(inv=f"{metrics['invariant_loss']:.3g}", rec=f"{metrics['reconstruction_loss']:.3g}")
        if invariant_mse < best[0]:
            best = (invariant_mse, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        if checkpoint_folder is not None and time.monotonic() - last_saved >= CHECKPOINT_SECONDS:
            last_saved = time.monotonic()
            checkpoints.save(
                checkpoint_folder,
                "epoch",
                epoch,
                modules={"model": model},
                optimizer=optimizer,
                scheduler=scheduler,
                generators={"shuffle": generator},
                tensors={f"best/{k}": v for k, v in best[2].items()},
                meta={"work_key": key, "history": history, "best_invariant_mse": best[0], "best_epoch": best[1]},
            )

    model.load_state_dict(best[2])
    return FitResult(model.eval(), best[1], best[0], selected_on, train_index, holdout_index, history)


def pca_reconstruction_mse(
    embeddings: np.ndarray, labels: np.ndarray, train_index: np.ndarray, eval_index: np.ndarray, kept: int
) -> float:
    """Baseline for the cVPN: per-class PCA keeping `kept` dims, fit on train, MSE on the evaluation split."""
    squared_error, count = 0.0, 0
    for c in np.unique(labels[eval_index]):
        train = embeddings[train_index][labels[train_index] == c]
        points = embeddings[eval_index][labels[eval_index] == c]
        if len(train) == 0:
            continue
        pca = PCA(n_components=min(kept, *train.shape)).fit(train)
        squared_error += float(np.square(pca.inverse_transform(pca.transform(points)) - points).sum())
        count += points.size
    return squared_error / max(count, 1)


def main(params: Params) -> dict:
    layout = layout_for(params)
    seed_everything(params.seed)
    device = resolve_device(params.device)
    num_classes = get_benchmark(params.benchmark).num_classes
    embeddings, labels = load_embeddings(layout.embeddings, num_classes)
    dim = embeddings.shape[1]
    if dim < 2:
        raise UserError(f"{layout.embeddings}: embeddings of dimension {dim}; a cVPN needs at least 2")

    settings = params.cvpn
    num_invariants = count_invariants(embeddings, labels, settings.pca_variance_percent, settings.invariant_rule)
    result = fit_cvpn(
        embeddings, labels, num_classes, settings, num_invariants, seed=params.seed, device=device, checkpoint_folder=layout.cvpn_checkpoints
    )

    eval_index = result.holdout_index if len(result.holdout_index) else result.train_index
    x = torch.as_tensor(embeddings[eval_index], device=device)
    y = torch.as_tensor(labels[eval_index], device=device)
    _, cvpn_reconstruction = evaluate(result.model, x, y)
    pca_reconstruction = pca_reconstruction_mse(embeddings, labels, result.train_index, eval_index, dim - num_invariants)

    saved = {
        **result.model.architecture(),
        "preprocess": settings.preprocess,
        **({"mean": result.model.center.cpu().tolist()} if settings.preprocess == "center" else {}),
        "pca_variance_percent": settings.pca_variance_percent,
        "best_epoch": result.best_epoch,
        "selected_on": result.selected_on,
        "best_holdout_invariant_mse": result.best_invariant_mse,
        "holdout_reconstruction_mse": cvpn_reconstruction,
        "pca_reconstruction_mse": pca_reconstruction,
        # < 1: the non-linear invariants lose less than dropping the same number of PCA dims.
        "reconstruction_vs_pca": cvpn_reconstruction / pca_reconstruction if pca_reconstruction > 0 else None,
    }
    save_weights(layout.cvpn, result.model, saved)
    shutil.rmtree(layout.cvpn_checkpoints, ignore_errors=True)  # the model is saved: nothing left to resume
    tracking.log_metrics(
        {k: saved[k] for k in ("best_holdout_invariant_mse", "holdout_reconstruction_mse", "pca_reconstruction_mse")}
        | {"num_invariants": num_invariants}
    )
    tracking.log_artifact(layout.cvpn)
    return saved
