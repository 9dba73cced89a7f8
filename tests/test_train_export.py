"""The end-of-run files: frozen components copied (never linked to a shared cache)."""

from __future__ import annotations

import os

from train.export import copy_tree


def test_copy_tree_never_links_to_the_base_files(tmp_path):
    """A hub-cache layout (snapshot symlinks to shared blobs): the export holds independent copies."""
    blobs, snapshot, out = tmp_path / "blobs", tmp_path / "snapshot" / "text_encoder", tmp_path / "out"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    (blobs / "abc123").write_bytes(b"weights")
    (snapshot / "model.safetensors").symlink_to(blobs / "abc123")
    (snapshot / "config.json").write_text("{}")
    out.mkdir()
    os.link(blobs / "abc123", out / "model.safetensors")  # left by an older export that hard-linked

    copy_tree(str(snapshot), str(out))
    for name in ("model.safetensors", "config.json"):
        assert not (out / name).is_symlink()
        assert not os.path.samefile(out / name, snapshot / name)
    assert (out / "model.safetensors").read_bytes() == b"weights"
    (out / "model.safetensors").write_bytes(b"saved over in place")  # what a later save_pretrained does
    assert (blobs / "abc123").read_bytes() == b"weights"  # the shared cache file is untouched


def test_loss_curve_is_a_640x360_png_of_the_steps(tmp_path):
    import numpy as np
    from PIL import Image

    from train.export import draw_loss_curve

    losses = list(np.exp(-np.linspace(0, 3, 200)) + 0.05 * np.sin(np.arange(200)))
    path = draw_loss_curve(losses, str(tmp_path / "curve.png"), "prior training loss", last_step=250)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (640, 360)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    curve_blue = (np.abs(pixels - [20, 60, 160]).sum(-1) < 60).sum()  # the moving average's colour
    assert curve_blue > 500  # a line was drawn, not an empty frame
    with Image.open(draw_loss_curve([], str(tmp_path / "empty.png"))) as empty:  # no step yet: axes only
        assert empty.size == (640, 360)
