"""VisualDL must import next to paddle + paddlenlp and round-trip a scalar, an image and hparams."""
import os

import numpy as np


def test_visualdl_scalar_image_roundtrip(tmp_path):
    import paddle  # noqa: F401  (import order as in training)
    from paddlenlp.trainer import Trainer  # noqa: F401
    from visualdl import LogReader, LogWriter

    img = (np.arange(8 * 6 * 3) % 256).astype("uint8").reshape(8, 6, 3)
    with LogWriter(logdir=str(tmp_path)) as w:
        w.add_scalar("train/loss", 0.5, 1)
        w.add_scalar("train/loss", 0.25, 2)
        w.add_image("samples/0", img, 1)
        # paddlenlp writes hparams with bool values at train start: this crashed with protobuf 7
        w.add_hparams({"learning_rate": 1e-4, "use_ema": True}, ["train/loss"])
    files = os.listdir(tmp_path)
    assert len(files) == 1
    reader = LogReader(file_path=str(tmp_path / files[0]))
    tags = reader.get_tags()
    assert tags["scalar"] == ["train/loss"]
    assert tags["image"] == ["samples/0"]
    scalars = reader.get_data("scalar", "train/loss")
    assert [(s.id, round(s.value, 6)) for s in scalars] == [(1, 0.5), (2, 0.25)]
    images = reader.get_data("image", "samples/0")
    assert len(images) == 1 and images[0].id == 1
    # the stored image is an encoded PNG of our pixels
    import io

    from PIL import Image

    back = np.asarray(Image.open(io.BytesIO(images[0].image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(back, img)
