"""Broken and untrusted inputs: each is refused with one line naming the file and the fix, exit 2,
no traceback (unless --debug); a crafted pickle is never unpickled (its marker file never appears).

In-process `ncis` calls on hand-made inputs: seconds each.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from faults import (
    ROOT,
    TINY,
    assert_one_line_error,
    sets,
    truncate,
    write_digit_folder,
    write_embeddings,
    write_payload,
)

from ncis import train_cvpn
from ncis.cli import main
from ncis.errors import UserError
from ncis.io import load_arrays, read_safetensors, trusted_single_file
from ncis.layout import Layout


@pytest.fixture
def ncis(tmp_path, capsys):
    """Run `ncis <stage>` in this process on tmp_path/outputs; returns (exit code, everything printed)."""

    def call(stage: str, *overrides: str, debug: bool = False) -> tuple[int, str]:
        args = [stage, "--params", str(ROOT / "params.yaml"), *sets([f"outputs={tmp_path / 'outputs'}", *TINY, *overrides])]
        code = main(args + (["--debug"] if debug else []))
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return call


@pytest.fixture
def layout(tmp_path) -> Layout:
    return Layout(tmp_path / "outputs")


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PAYLOAD-RAN"


# ---------------------------------------------------------------- arrays (train-cvpn reads embeddings.npz)


def test_truncated_embeddings_name_the_file_and_the_stage_that_rewrites_it(ncis, layout):
    truncate(write_embeddings(layout.embeddings))
    code, output = ncis("train-cvpn")
    assert code == 2
    assert_one_line_error(output, str(layout.embeddings), "truncated or corrupt", "rerun `ncis embed`")
    assert not layout.cvpn.exists()


def test_corrupted_bytes_inside_embeddings_are_caught_by_the_zip_checksum(ncis, layout):
    path = write_embeddings(layout.embeddings)
    data = bytearray(path.read_bytes())
    data[300:340] = bytes(40)  # inside the first array's data
    path.write_bytes(bytes(data))
    code, output = ncis("train-cvpn")
    assert code == 2
    assert_one_line_error(output, str(layout.embeddings), "corrupt")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_embeddings_with_nan_or_inf_are_refused_with_their_position(ncis, layout, bad):
    vectors = np.ones((80, 6), np.float32)
    vectors[17, 2] = bad
    write_embeddings(layout.embeddings, embeddings=vectors)
    code, output = ncis("train-cvpn")
    assert code == 2
    assert_one_line_error(output, str(layout.embeddings), "'embeddings'", "NaN/Inf", "(17, 2)", "ncis embed")


def test_labels_beyond_the_class_count_are_refused(ncis, layout):
    write_embeddings(layout.embeddings, classes=12)
    code, output = ncis("train-cvpn")
    assert code == 2
    assert_one_line_error(output, str(layout.embeddings), "labels outside [0, 10)", "another benchmark")


def test_a_pickle_in_place_of_embeddings_is_never_unpickled(ncis, layout, marker):
    write_payload(layout.embeddings, marker)
    code, output = ncis("train-cvpn")
    assert code == 2
    assert_one_line_error(output, str(layout.embeddings), "pickled data", "never unpickles")
    assert not marker.exists()


def test_debug_shows_the_traceback(ncis, layout):
    truncate(write_embeddings(layout.embeddings))
    with pytest.raises(UserError, match="truncated or corrupt"):
        ncis("train-cvpn", debug=True)


# ---------------------------------------------------------------- weights (sample reads the cVPN)


@pytest.fixture
def trained_cvpn(ncis, layout):
    write_embeddings(layout.embeddings)
    assert ncis("train-cvpn")[0] == 0
    return layout.cvpn


def test_truncated_cvpn_weights_are_refused(ncis, layout, trained_cvpn):
    truncate(trained_cvpn / "model.safetensors", 0.9)
    code, output = ncis("sample")
    assert code == 2
    assert_one_line_error(output, str(trained_cvpn / "model.safetensors"), "truncated", "rerun `ncis train-cvpn`")
    assert not layout.outliers.exists()


def test_unreadable_cvpn_config_is_refused(ncis, trained_cvpn):
    truncate(trained_cvpn / "config.json")
    code, output = ncis("sample")
    assert code == 2
    assert_one_line_error(output, str(trained_cvpn / "config.json"), "not valid JSON", "ncis train-cvpn")


def test_a_torch_pickle_in_place_of_safetensors_is_never_unpickled(ncis, trained_cvpn, marker):
    write_payload(trained_cvpn / "model.safetensors", marker, torch_format=True)
    code, output = ncis("sample")
    assert code == 2
    assert_one_line_error(output, str(trained_cvpn / "model.safetensors"), "pickle", "never unpickles")
    assert not marker.exists()


def test_a_cvpn_of_another_dimension_is_refused(ncis, layout, trained_cvpn):
    write_embeddings(layout.embeddings, dim=5)
    code, output = ncis("sample")
    assert code == 2
    assert_one_line_error(output, str(trained_cvpn), "dimension 6", "dimension 5", "rerun `ncis train-cvpn`")


def test_weights_that_do_not_fit_their_config_are_refused(ncis, trained_cvpn):
    config = json.loads((trained_cvpn / "config.json").read_text())
    (trained_cvpn / "config.json").write_text(json.dumps({**config, "hidden": config["hidden"] * 2}))
    code, output = ncis("sample")
    assert code == 2
    assert_one_line_error(output, str(trained_cvpn / "model.safetensors"), "does not fit", "ncis train-cvpn")


def test_a_config_without_architecture_keys_is_refused(ncis, trained_cvpn):
    config = json.loads((trained_cvpn / "config.json").read_text())
    del config["coupling_layers"]
    (trained_cvpn / "config.json").write_text(json.dumps(config))
    code, output = ncis("sample")
    assert code == 2
    assert_one_line_error(output, "lacks ['coupling_layers']", "ncis train-cvpn")


# ---------------------------------------------------------------- images, checkpoints, classifiers

CLASSIFIER = ["classifier.outliers=none", "classifier.batch_size=16"]


@pytest.fixture
def trained_classifier(ncis, layout):
    write_digit_folder(layout.id_train)
    assert ncis("train-classifier", *CLASSIFIER)[0] == 0
    return layout.classifier


def test_a_truncated_png_is_named(ncis, layout):
    write_digit_folder(layout.id_train)
    broken = truncate(layout.id_train / "3" / "2.png", 0.6)
    code, output = ncis("train-classifier", *CLASSIFIER)
    assert code == 2
    assert_one_line_error(output, str(broken), "not a readable image", "ncis prepare")
    assert not layout.classifier.exists()


def test_a_pickle_in_place_of_a_classifier_checkpoint_is_never_unpickled(ncis, layout, trained_classifier, marker):
    [checkpoint] = layout.classifier_checkpoints.glob("epoch_*")
    write_payload(checkpoint / "state.safetensors", marker, torch_format=True)
    code, output = ncis("train-classifier", *CLASSIFIER)  # the same run again: resumes from its last checkpoint
    assert code == 2
    assert_one_line_error(output, str(checkpoint / "state.safetensors"), "pickle", "rerun `ncis train-classifier`")
    assert not marker.exists()


def test_a_classifier_saved_for_another_architecture_is_refused(ncis, trained_classifier):
    config = json.loads((trained_classifier / "config.json").read_text())
    (trained_classifier / "config.json").write_text(json.dumps({**config, "arch": "wrn40_2"}))
    code, output = ncis("evaluate")
    assert code == 2
    assert_one_line_error(output, str(trained_classifier / "model.safetensors"), "does not fit", "ncis train-classifier")


def test_a_classifier_for_another_class_count_is_refused(ncis, trained_classifier):
    config = json.loads((trained_classifier / "config.json").read_text())
    (trained_classifier / "config.json").write_text(json.dumps({**config, "num_classes": 12}))
    code, output = ncis("evaluate")
    assert code == 2
    assert_one_line_error(output, str(trained_classifier / "model.safetensors"), "does not fit")


@pytest.mark.parametrize("layout_kind", ["empty", "flat", "named"])
def test_an_empty_or_mislaid_image_folder_is_refused(ncis, layout, layout_kind):
    layout.id_train.mkdir(parents=True)
    if layout_kind == "flat":  # images without class folders
        write_digit_folder(layout.id_train / "tmp")
        for png in (layout.id_train / "tmp").rglob("*.png"):
            png.rename(layout.id_train / f"{png.parent.name}_{png.name}")
        shutil.rmtree(layout.id_train / "tmp")
    elif layout_kind == "named":  # class folders named, not numbered
        write_digit_folder(layout.id_train)
        for folder in list(layout.id_train.iterdir()):
            folder.rename(folder.with_name(f"class{folder.name}"))
    code, output = ncis("train-classifier", *CLASSIFIER)
    assert code == 2
    assert_one_line_error(output, str(layout.id_train))


def test_embed_names_an_image_folder_without_class_folders(ncis, layout, untrained_pipeline_dir):
    layout.id_train.mkdir(parents=True)
    code, output = ncis("embed", f"diffusion.model={untrained_pipeline_dir}")
    assert code == 2
    assert_one_line_error(output, str(layout.id_train), "<class index>/<n>.png")


# ---------------------------------------------------------------- diffusion models from elsewhere


def test_a_ckpt_is_refused_before_anything_reads_it(ncis, tmp_path, marker):
    checkpoint = write_payload(tmp_path / "model.ckpt", marker, torch_format=True)
    code, output = ncis("embed", f"diffusion.model={checkpoint}")
    assert code == 2
    assert_one_line_error(output, str(checkpoint), "pickle checkpoint", "diffusion.allow_pickle=true")
    assert not marker.exists()


def test_a_pickle_named_safetensors_is_refused(ncis, tmp_path, marker):
    checkpoint = write_payload(tmp_path / "model.safetensors", marker)
    code, output = ncis("embed", f"diffusion.model={checkpoint}")
    assert code == 2
    assert_one_line_error(output, str(checkpoint), "pickle", "never unpickles")
    assert not marker.exists()


def test_a_diffusers_folder_with_pickled_weights_is_refused(ncis, tmp_path, untrained_pipeline_dir, marker):
    folder = tmp_path / "model"
    shutil.copytree(untrained_pipeline_dir, folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    write_payload(folder / "unet" / "diffusion_pytorch_model.bin", marker, torch_format=True)
    code, output = ncis("embed", f"diffusion.model={folder}")
    assert code == 2
    assert_one_line_error(output, "diffusion_pytorch_model.bin", "pickled weights", "diffusion.allow_pickle=true")
    assert not marker.exists()


def test_allow_pickle_unpickles_a_trusted_ckpt_into_safetensors(tmp_path):
    """The documented opt-in: the whole checkpoint (here with a non-tensor object, as Lightning's
    are) is unpickled, and only its state dict's tensors reach diffusers, as safetensors."""
    weight = torch.arange(6.0).reshape(2, 3)
    torch.save({"state_dict": {"w": weight, "view": weight[0], "step": 3}, "callbacks": {"kind": object()}}, tmp_path / "m.ckpt")
    with pytest.raises(UserError, match="allow_pickle"):
        with trusted_single_file(tmp_path / "m.ckpt"):
            pass
    with trusted_single_file(tmp_path / "m.ckpt", allow_pickle=True) as converted:
        tensors = read_safetensors(converted)
    assert set(tensors) == {"w", "view"}
    assert torch.equal(tensors["w"], weight) and torch.equal(tensors["view"], weight[0])
    assert not os.path.exists(converted)  # a temporary copy only


# ---------------------------------------------------------------- the CLI's own failure modes


def test_an_unexpected_error_is_one_line_pointing_to_debug(ncis, layout, monkeypatch):
    def broken(params):
        raise ValueError("something nobody foresaw\nsecond line")

    monkeypatch.setattr(train_cvpn, "main", broken)
    code, output = ncis("train-cvpn")
    assert code == 1
    assert_one_line_error(output, "unexpected ValueError: something nobody foresaw", "--debug")
    with pytest.raises(ValueError):
        ncis("train-cvpn", debug=True)


@pytest.fixture
def default_handling():
    """`reset(signum)` gives a signal Python's own handling for the test (KeyboardInterrupt for
    SIGINT, the system default for the others), as a fresh `ncis` process in a terminal has it,
    whatever runs the tests: a background job of a non-interactive shell ignores SIGINT, `nohup`
    SIGHUP. The previous handlers come back after the test."""
    saved = {}

    def reset(signum: int) -> None:
        saved.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    yield reset
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_stop_signal_mid_stage_exits_with_one_line_naming_the_stage(ncis, layout, monkeypatch, default_handling, signum, code):
    """A real signal to this process while a stage runs: the stage unwinds like after Ctrl-C."""
    default_handling(signum)
    write_embeddings(layout.embeddings)
    fit = train_cvpn.fit_cvpn

    def fit_then_signal(*args, **kwargs):
        fit(*args, **kwargs)
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not stop the stage")

    monkeypatch.setattr(train_cvpn, "fit_cvpn", fit_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    exit_code, output = ncis("train-cvpn")
    assert exit_code == code
    lines = [line for line in output.splitlines() if line.startswith("ncis: ")]
    assert lines == [
        f"ncis: stopped by {signal.Signals(signum).name} during stage train-cvpn; finished outputs are kept and "
        "nothing half-written is left: rerun the same command to resume"
    ]
    assert not layout.cvpn.exists() and not list(layout.root.glob(".*ncis-tmp*"))
    assert signal.getsignal(signal.SIGTERM) == before  # the CLI put the handlers back
    assert load_arrays(layout.embeddings)  # the input is untouched


def test_the_payload_runs_when_unpickled(tmp_path, marker):
    """The control of every `not marker.exists()` above: unpickling the crafted file does run it."""
    import pickle

    pickle.loads(write_payload(tmp_path / "payload.pkl", marker).read_bytes())
    assert marker.exists()
    marker.unlink()
    torch.load(write_payload(tmp_path / "payload.ckpt", marker, torch_format=True), weights_only=False)
    assert marker.exists()


def test_a_corrupt_resume_chunk_is_named_and_deleting_it_resumes(ncis, layout, untrained_pipeline_dir):
    """Resume state is reused as it is: the fix for a bad chunk is to delete it, not to rerun."""
    write_digit_folder(layout.id_train, per_class=2)
    embed = ("embed", f"diffusion.model={untrained_pipeline_dir}", "embed.image_limit=0", "embed.chunk_size=8", "embed.batch_size=8")
    assert ncis(*embed)[0] == 0
    expected = load_arrays(layout.embeddings)
    chunk = layout.embed_dir / "chunks" / "00000008.npz"
    truncate(chunk)
    code, output = ncis(*embed)
    assert code == 2
    assert_one_line_error(output, str(chunk), "truncated or corrupt", "delete it and rerun `ncis embed`")
    chunk.unlink()
    assert ncis(*embed)[0] == 0
    np.testing.assert_array_equal(load_arrays(layout.embeddings)["embeddings"], expected["embeddings"])


def test_an_error_caused_by_a_stop_signal_reports_the_stop(ncis, layout, monkeypatch, default_handling):
    """With DataLoader workers (on a GPU), the SIGTERM that stops a job also kills the workers, and
    the main process may first see "worker killed": still a stop, not an unforeseen error."""
    default_handling(signal.SIGTERM)

    def worker_died(params):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()
        except KeyboardInterrupt:
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated.") from None

    monkeypatch.setattr(train_cvpn, "main", worker_died)
    code, output = ncis("train-cvpn")
    assert code == 143
    assert [line for line in output.splitlines() if line.startswith("ncis:")] == [
        "ncis: stopped by SIGTERM during stage train-cvpn; finished outputs are kept and nothing half-written "
        "is left: rerun the same command to resume"
    ]
    def worker_failed(params):
        raise RuntimeError("DataLoader worker (pid 4242) exited unexpectedly")

    monkeypatch.setattr(train_cvpn, "main", worker_failed)
    code, output = ncis("train-cvpn")  # no signal this time: the next run does not remember the last one's
    assert code == 1 and "unexpected RuntimeError" in output
