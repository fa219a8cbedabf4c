"""Robust image decoding: bytes -> an RGB PIL image, or a reason why not.

Every stage that turns stored image bytes into pixels (the labels job, and the training stages
that must see the very same pixels) goes through :func:`decode_image`. It never raises for bad
input: it returns ``(image, None)`` for a usable image and ``(None, reason)`` otherwise, so one
bad file is skipped and reported instead of stopping a job.

What it does with awkward input:

- zero bytes, a text file named ``.jpg``, an unknown format -> rejected with a reason;
- a truncated or corrupt file (JPEG cut short, broken PNG stream) -> rejected (``Image.LOAD_TRUNCATED_IMAGES``
  is never turned on: a grey half-image would get confident labels);
- CMYK, YCbCr, bilevel (``1``), grayscale (``L``) -> converted to RGB;
- 16-bit grayscale (``I;16*``) and 32-bit integer (``I``) -> scaled to 8 bits (``value / 257``,
  so 65535 -> 255, not clipped), float (``F``) -> ``[0, 1]`` scaled or clipped to ``[0, 255]``;
- transparency (``RGBA``, ``LA``, ``PA``, palette or grey with a ``transparency`` entry) -> composited on white;
- decompression bombs: the pixel count is read from the header before any pixel is decoded.
  Above the limit (``max_pixels``; default PIL's ``Image.MAX_IMAGE_PIXELS``, about 89.5 Mpx) a
  JPEG is decoded downscaled by libjpeg's DCT scaling (1/2, 1/4 or 1/8, whichever first fits the
  limit, so memory stays bounded by the limit), and any other image, or a JPEG still too large at
  1/8, is rejected. A 20000 x 20000 PNG is therefore rejected without allocating its pixels, and
  a 20000 x 20000 JPEG is decoded at 1/4 scale, 5000 x 5000.

EXIF orientation is not applied (LLaVA does not either); the point is that labels and training
decode identically, which they do by both calling this function.

A decoded image then goes through one geometry, the same in every stage (:func:`image_geometry`,
chosen by ``data.image_aspect``): ``crop`` (:class:`ResizeCenterCrop`, the CLIP processor's
resize + centre crop, which cuts the long sides of a non-square photo off) or ``pad``
(:class:`PadSquareResizeCenterCrop`, LLaVA-1.5's pad to a square of the tower's mean colour first,
which keeps the whole photo). Each records itself by its ``rule`` (:data:`ASPECT_RULES`).
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

_PIL_DEFAULT_LIMIT = 89_478_485  # PIL's own default, used only when Image.MAX_IMAGE_PIXELS is None
_WHITE = (255, 255, 255)


def pixel_limit(max_pixels: Optional[int] = None) -> int:
    """The pixel-count limit in force: ``max_pixels`` or PIL's ``Image.MAX_IMAGE_PIXELS``."""
    if max_pixels is not None:
        return int(max_pixels)
    return int(Image.MAX_IMAGE_PIXELS or _PIL_DEFAULT_LIMIT)


def _open(data: bytes):
    """A lazily-opened PIL image (header parsed, no pixel decoded).

    ``Image.open`` without its built-in bomb check (which uses the global
    ``Image.MAX_IMAGE_PIXELS`` and would refuse a huge JPEG before ``draft`` could shrink it):
    the same plugin search, then :func:`_shrink_or_reject` applies this call's own limit."""
    fp = io.BytesIO(data)
    prefix = data[:16]
    tried: set[str] = set()
    for loader in (Image.preinit, Image.init):
        loader()
        for fmt in list(Image.ID):
            if fmt in tried:
                continue
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            result = not accept or accept(prefix)
            if isinstance(result, str) or not result:  # a str is Pillow's "maybe, but unsupported" note
                continue
            try:
                fp.seek(0)
                return factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise UnidentifiedImageError("cannot identify image file")


def _shrink_or_reject(im, limit: int) -> Optional[str]:
    """Make ``im`` fit ``limit`` pixels before decoding (JPEG draft), or return a reason."""
    w, h = im.size
    if w * h <= limit:
        return None
    if im.format == "JPEG":
        for scale in (2, 4, 8):
            size = (math.ceil(w / scale), math.ceil(h / scale))
            if size[0] * size[1] <= limit:
                im.draft(im.mode if im.mode in ("RGB", "L") else None, size)
                if im.size[0] * im.size[1] <= limit:
                    return None
                break
    return f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {limit}"


def _composite_on_white(im) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_l(im) -> Image.Image:
    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr.astype(np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        out = np.clip(np.rint(arr), 0, 255)
    else:  # I;16 variants and I: a 16-bit range, scaled so that 65535 -> 255
        arr = np.clip(arr.astype(np.int64), 0, 65535)
        out = (arr * 255 + 32767) // 65535
    return Image.fromarray(out.astype(np.uint8))  # 2-D uint8 -> mode L


def to_rgb(im) -> Image.Image:
    """Convert a decoded PIL image of any mode to RGB (see the module docstring)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        if mode.startswith("I") or mode == "F":
            im = _high_depth_to_l(im)
        return _composite_on_white(im)
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(im).convert("RGB")
    return im.convert("RGB")


def decode_image(data: Optional[bytes], max_pixels: Optional[int] = None) -> tuple[Optional[Image.Image],
                                                                                    Optional[str]]:
    """``(RGB image, None)`` or ``(None, reason)``; never raises for bad input.

    ``max_pixels``: the decompression-bomb limit (default PIL's ``Image.MAX_IMAGE_PIXELS``).
    """
    if data is None or len(data) == 0:
        return None, "empty file (0 bytes)"
    limit = pixel_limit(max_pixels)
    try:
        im = _open(bytes(data))
    except UnidentifiedImageError:
        return None, f"not an image: unrecognised format (first bytes {bytes(data[:8])!r})"
    except Exception as exc:  # noqa: BLE001 - any header-parsing failure is a bad file
        return None, f"not an image: cannot parse the header ({type(exc).__name__}: {exc})"
    try:
        reason = _shrink_or_reject(im, limit)
        if reason:
            return None, reason
        im.load()
    except Exception as exc:  # noqa: BLE001 - truncated data, broken streams, decoder errors
        return None, f"truncated or corrupt image data ({type(exc).__name__}: {exc})"
    try:
        return to_rgb(im), None
    except Exception as exc:  # noqa: BLE001 - a mode PIL cannot convert
        return None, f"unsupported image mode {im.mode!r} ({type(exc).__name__}: {exc})"


# What each geometry does, as labels datasets and checkpoints record it (transform_spec["resize"]).
RESIZE_RULE = "shortest-bicubic+floor-center-crop"
PAD_RULE = "pad-mean-square+" + RESIZE_RULE
# data.image_aspect -> its rule (labels written before image_aspect existed record RESIZE_RULE: crop)
ASPECT_RULES = {"crop": RESIZE_RULE, "pad": PAD_RULE}


class ResizeCenterCrop:
    """Resize the shortest side to ``size`` (bicubic), centre-crop ``size x size``, RGB: the
    geometry of every tower's eval transform, in pure PIL (the decode tasks never import torch).

    Pixel for pixel what Hugging Face's ``CLIPImageProcessor`` (PIL backend) gives, as LLaVA
    preprocesses: the long side becomes ``int(size * long / short)`` and the crop's offset is
    ``(new - size) // 2``. (torchvision's ``CenterCrop``, in open_clip's transform, rounds that
    offset instead: one pixel apart for some sizes, so an exported model would see other pixels.)"""

    rule = RESIZE_RULE

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        size = self.size
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.BICUBIC)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        if (new_w, new_h) != (size, size):
            img = img.crop((left, top, left + size, top + size))
        return img if img.mode == "RGB" else img.convert("RGB")

    def refusal(self, w: int, h: int, limit: int) -> Optional[str]:
        """Why a ``w x h`` image is not put through this geometry (the image it would make in
        between has more than ``limit`` pixels), or None: a 1 x 20000 strip would resize to
        224 x 4.5 M."""
        resized = self.size * int(self.size * max(w, h) / max(1, min(w, h)))
        if resized > limit:
            return (f"extreme aspect ratio: {w}x{h} resized to {self.size} px on its short side would be "
                    f"{resized} pixels")
        return None

    def __repr__(self) -> str:
        return f"ResizeCenterCrop({self.size})"


def pad_color(mean) -> tuple[int, ...]:
    """The pad colour of a tower's mean, LLaVA's ``tuple(int(x * 255) for x in image_mean)``."""
    return tuple(int(m * 255) for m in mean)


class PadSquareResizeCenterCrop(ResizeCenterCrop):
    """LLaVA-1.5's ``image_aspect_ratio: pad``: the image pasted centred on a square canvas of
    side ``max(w, h)`` filled with the tower's mean colour (:func:`pad_color`; offsets
    ``(side - w) // 2`` and ``(side - h) // 2``, as LLaVA's ``expand2square``), then
    :class:`ResizeCenterCrop`, which on a square only resizes: the whole image is kept.

    Pixel for pixel what transformers' ``LlavaImageProcessor`` (PIL backend) gives with
    ``do_pad=True``. A square image is left as it is, so pad and crop agree on it."""

    rule = PAD_RULE

    def __init__(self, size: int, mean):
        super().__init__(size)
        self.fill = pad_color(mean)

    def __call__(self, img: Image.Image) -> Image.Image:
        img = img if img.mode == "RGB" else img.convert("RGB")  # LLaVA converts before it pads
        w, h = img.size
        if w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), self.fill)
            canvas.paste(img, ((side - w) // 2, (side - h) // 2))
            img = canvas
        return super().__call__(img)

    def refusal(self, w: int, h: int, limit: int) -> Optional[str]:
        side = max(w, h)
        if side * side > limit:
            return (f"extreme aspect ratio: {w}x{h} padded to a {side}x{side} square would be {side * side} "
                    "pixels")
        return None

    def __repr__(self) -> str:
        return f"PadSquareResizeCenterCrop({self.size}, fill={self.fill})"


def image_geometry(aspect: str, size: int, mean=None) -> ResizeCenterCrop:
    """The pure-PIL geometry of ``data.image_aspect`` (``crop`` | ``pad``) for a tower of
    ``size`` px; ``pad`` fills with the tower's ``mean`` colour."""
    if aspect == "crop":
        return ResizeCenterCrop(size)
    if aspect == "pad":
        if mean is None:
            raise ValueError("image_aspect 'pad' needs the tower's mean colour")
        return PadSquareResizeCenterCrop(size, mean)
    raise ValueError(f"unknown image_aspect {aspect!r}; valid: {', '.join(ASPECT_RULES)}")


def eval_transform(image_size: int, mean, std, aspect: str):
    """A tower's eval transform: :func:`image_geometry` (``aspect``), ``ToTensor``, ``Normalize``."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    return Compose([image_geometry(aspect, image_size, mean), ToTensor(), Normalize(mean, std)])


def split_transform(transform):
    """Split a torchvision ``Compose`` (the tower's eval transform) at its ToTensor step.

    Returns ``(pil_part, tensor_part)``: ``pil_part(img)`` gives the resized and cropped PIL image
    (shipped as uint8; the pure-PIL geometry of :func:`eval_transform`, a :class:`ResizeCenterCrop`
    or :class:`PadSquareResizeCenterCrop`, so decode tasks need no torch), ``tensor_part(x)`` normalises a float batch
    ``[B, 3, H, W]`` in ``[0, 1]``. :func:`to_model_input` composes them into exactly what
    ``transform`` gives per image.
    """
    from torchvision.transforms import Compose, ToTensor

    steps = list(getattr(transform, "transforms", [transform]))
    cut = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
    if cut is None:
        raise ValueError(f"the transform has no ToTensor step: {transform}")
    pure = len(steps[:cut]) == 1 and isinstance(steps[0], ResizeCenterCrop)
    pil_part = steps[0] if pure else Compose(steps[:cut])
    return pil_part, Compose(steps[cut + 1:])


def pil_to_uint8(img: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` uint8 array of an RGB image (what the decode tasks ship)."""
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
    return arr


def to_model_input(batch_uint8, tensor_part):
    """``[B, H, W, 3]`` uint8 (numpy or torch) -> the model's float tensor ``[B, 3, H, W]``.

    The same operations, in the same order and dtype, as torchvision's ``ToTensor`` followed by
    ``tensor_part``, so the result equals the per-image transform exactly.
    """
    import torch

    x = as_tensor(batch_uint8)
    x = x.permute(0, 3, 1, 2).contiguous().to(dtype=torch.get_default_dtype()).div(255)
    return tensor_part(x)


def as_tensor(array):
    """``torch.as_tensor`` without copying read-only arrays (Ray hands batches out read-only);
    callers never write into the result in place, so torch's warning about it does not apply."""
    import torch

    if isinstance(array, torch.Tensor):
        return array
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(np.ascontiguousarray(array))
