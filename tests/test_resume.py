"""Resumable work: partial results are reused by the same work only; per-item random streams."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

from ncis.errors import UserError
from ncis.resume import claim, content_digest, work_key
from ncis.runtime import item_generator


def test_the_work_key_follows_settings_and_every_input_file(tmp_path):
    inputs = tmp_path / "images"
    (inputs / "0").mkdir(parents=True)
    image = inputs / "0" / "0.png"
    image.write_bytes(b"abc")
    key = work_key({"lr": 0.1}, {"images": inputs})
    assert work_key({"lr": 0.1}, {"images": inputs}) == key
    assert work_key({"lr": 0.2}, {"images": inputs}) != key
    image.write_bytes(b"abcd")  # a re-prepared dataset
    assert work_key({"lr": 0.1}, {"images": inputs}) != key
    changed = work_key({"lr": 0.1}, {"images": inputs})
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, rewritten later
    assert work_key({"lr": 0.1}, {"images": inputs}) != changed
    (inputs / "0" / "1.png").write_bytes(b"x")  # one more image
    assert work_key({"lr": 0.1}, {"images": inputs}) != changed


def test_claim_resumes_the_same_work_and_discards_or_refuses_other_work(tmp_path):
    folder = tmp_path / "chunks"
    assert claim(folder, "a") is False
    (folder / "part0").write_text("done")
    assert claim(folder, "a") is True and (folder / "part0").exists()
    assert claim(folder, "b") is False and not (folder / "part0").exists()
    (folder / "part0").write_text("b's work")
    with pytest.raises(UserError, match="other settings"):
        claim(folder, "c", discard_other=False)
    assert (folder / "part0").read_text() == "b's work"


def test_a_folder_without_a_stamp_is_never_taken_for_this_work(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    with pytest.raises(UserError):
        claim(folder, "a", discard_other=False)
    assert claim(folder, "a") is False and not (folder / "metrics.json").exists()


def test_the_content_digest_follows_every_array_but_not_file_times():
    images, labels = np.arange(12, dtype=np.uint8).reshape(3, 4), np.array([0, 1, 1])
    digest = content_digest(images, labels)
    assert content_digest(images.copy(), labels.copy()) == digest  # the same data, written again
    assert content_digest(np.asfortranarray(images), labels) == digest  # memory order is not content
    changed = images.copy()
    changed[2, 3] += 1
    assert content_digest(changed, labels) != digest
    assert content_digest(images, np.array([0, 1, 2])) != digest
    assert content_digest(labels, images) != digest


def test_a_stamp_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    """A real ENOSPC on a full tmpfs (needs mount rights): the write error, not an unexpected one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (disk / "work").mkdir()
        with open(disk / "filler", "wb", buffering=0) as handle:  # unbuffered: the failing write is the last
            with pytest.raises(OSError):
                while True:
                    handle.write(b"\0" * 4096)
        with pytest.raises(UserError, match=r"^cannot write .*work-key\.txt: No space left on device; free disk space"):
            claim(disk / "work", "a")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_an_items_random_stream_depends_on_seed_and_index_only():
    draw = lambda seed, index: torch.randn(4, generator=item_generator(seed, index))  # noqa: E731
    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(0, 6))
    assert not torch.equal(draw(0, 5), draw(1, 5))
