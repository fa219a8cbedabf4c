"""Robust image decoding: every awkward input converts or returns a reason; bombs never allocate."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sea_ray.data.images import ResizeCenterCrop, decode_image, pil_to_uint8, split_transform, to_model_input


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_image(w=50, h=40, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of ``width x height`` pixels, all black (~50 KB), built row by row."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def bad_and_awkward_images() -> dict[str, bytes]:
    """Name -> bytes of each awkward input the job must survive (shared with the job tests)."""
    base = rgb_image()
    jpeg = encode(base, "JPEG")
    rgba = np.dstack([np.asarray(base), np.full((40, 50), 128, np.uint8)])
    return {
        "zero_bytes": b"",
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "text_named_jpg": b"this is not an image, just text saved as .jpg\n",
        "cmyk_jpeg": encode(base.convert("CMYK"), "JPEG"),
        "grayscale_png": encode(base.convert("L"), "PNG"),
        "gray16_png": encode(Image.fromarray((np.arange(2000).reshape(40, 50) * 30).astype(np.uint16)), "PNG"),
        "rgba_png": encode(Image.fromarray(rgba), "PNG"),
        "palette_transparent_png": encode(base.convert("P"), "PNG", transparency=0),
        "bomb_png": png_bomb(),
    }


GOOD_AFTER_CONVERSION = {"cmyk_jpeg", "grayscale_png", "gray16_png", "rgba_png", "palette_transparent_png"}
EXPECTED_REASON = {"zero_bytes": "empty file", "truncated_jpeg": "truncated", "text_named_jpg": "not an image",
                   "bomb_png": "decompression bomb"}


@pytest.mark.parametrize("name", sorted(EXPECTED_REASON))
def test_bad_inputs_return_a_reason(name):
    img, reason = decode_image(bad_and_awkward_images()[name])
    assert img is None
    assert reason and EXPECTED_REASON[name] in reason


@pytest.mark.parametrize("name", sorted(GOOD_AFTER_CONVERSION))
def test_awkward_modes_convert_to_rgb(name):
    img, reason = decode_image(bad_and_awkward_images()[name])
    assert reason is None and img.mode == "RGB" and img.size == (50, 40)


def test_conversions_keep_the_values_that_matter():
    base = rgb_image()
    # 16-bit: scaled to 8 bits (65535 -> 255), not clipped at 255
    a16 = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    img, _ = decode_image(encode(Image.fromarray(a16), "PNG"))
    assert np.asarray(img)[0, :, 0].tolist() == [0, 1, 255, 128]
    # fully transparent pixels composite onto white; opaque ones keep their colour
    rgba = np.dstack([np.asarray(base), np.zeros((40, 50), np.uint8)])
    rgba[0, 0, 3] = 255
    out = np.asarray(decode_image(encode(Image.fromarray(rgba), "PNG"))[0])
    assert (out[1:] == 255).all() and (out[0, 0] == np.asarray(base)[0, 0]).all()
    # grayscale becomes three equal channels
    out = np.asarray(decode_image(encode(base.convert("L"), "PNG"))[0])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    # a plain RGB PNG round-trips exactly
    assert np.array_equal(np.asarray(decode_image(encode(base, "PNG"))[0]), np.asarray(base))


def test_large_jpeg_is_decoded_downscaled_and_other_formats_rejected():
    big = rgb_image(512, 384)
    img, reason = decode_image(encode(big, "JPEG"), max_pixels=100 * 100)
    assert reason is None and img.size == (64, 48)  # 1/8 is the first DCT scale under the limit
    img, reason = decode_image(encode(big, "PNG"), max_pixels=100 * 100)
    assert img is None and reason.startswith("decompression bomb: 512x384")
    img, reason = decode_image(encode(big, "PNG"), max_pixels=512 * 384)
    assert reason is None and img.size == (512, 384)


def test_bomb_is_rejected_without_allocating_its_pixels(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb())
    # A fresh process (ru_maxrss survives exec on Linux; VmHWM, the peak resident set, does not).
    code = ("import json, re; from sea_ray.data.images import decode_image; "
            f"img, reason = decode_image(open({str(path)!r}, 'rb').read()); "
            "peak = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024; "
            "print(json.dumps({'reason': reason, 'peak_mb': peak}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1])
    assert out["reason"].startswith("decompression bomb")
    assert out["peak_mb"] < 200  # decoding it would take 400 MB (mode 1) to 1.2 GB (RGB)


def test_uint8_shipping_gives_exactly_the_towers_transform():
    from sea_ray.data.images import eval_transform

    transform = eval_transform(64, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711),
                               "crop")
    pil_part, tensor_part = split_transform(transform)
    assert isinstance(pil_part, ResizeCenterCrop)  # the decode side needs no torch
    sizes = [(100, 80), (64, 64), (30, 90), (63, 200), (1, 1), (300, 299), (65, 64), (127, 64), (20, 20), (64, 999)]
    images = [rgb_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    shipped = np.stack([pil_to_uint8(pil_part(im)) for im in images])
    assert shipped.dtype == np.uint8 and shipped.shape == (len(sizes), 64, 64, 3)
    expected = torch.stack([transform(im) for im in images])
    assert torch.equal(to_model_input(shipped, tensor_part), expected)


def test_a_non_standard_transform_keeps_its_own_pil_steps():
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(64), T.ToTensor(),
                           T.Normalize((0.5,) * 3, (0.5,) * 3)])
    pil_part, tensor_part = split_transform(transform)
    assert not isinstance(pil_part, ResizeCenterCrop)
    im = rgb_image(90, 70)
    assert torch.equal(to_model_input(pil_to_uint8(pil_part(im))[None], tensor_part)[0], transform(im))


def test_decoding_for_the_labeler_never_imports_torch(tmp_path):
    path = tmp_path / "a.png"
    rgb_image(90, 70).save(path)
    code = ("import sys, pyarrow as pa; from sea_ray.data.images import ResizeCenterCrop; "
            "from sea_ray.labels.pipeline import decode_batch; "
            f"b = pa.table({{'row': [0], 'shard': [0], 'image_id': ['a'], 'uri': [{str(path)!r}], "
            "'image_bytes': pa.array([None], pa.binary())}); "
            "out = decode_batch(b, ResizeCenterCrop(64), None, 64); "
            "print(bool(out['ok'][0]), out['image'].shape, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "True (1, 64, 64, 3) False"


def test_jpeg_claiming_20000_px_is_decoded_at_a_safe_scale():
    data = bytearray(encode(rgb_image(16, 16), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", 20000, 20000)  # height, width in the frame header
    img, reason = decode_image(bytes(data))
    if img is not None:  # libjpeg pads the missing data; what matters is the scale it decoded at
        assert img.size == (5000, 5000) and img.mode == "RGB"
    else:
        assert "truncated" in reason or "bomb" in reason
