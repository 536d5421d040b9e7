"""Image processor for VLM-Mamba: load, convert to RGB, resize to a fixed grid, rescale, normalize."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict, load_image
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, is_torch_available

if is_torch_available():
    import torch

# The vision tower turns each image into a fixed grid of patches, so it needs one fixed input size.
DEFAULT_SIZE = {"height": 224, "width": 224}
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
MIN_IMAGE_SIDE = 2

# PIL modes that carry an alpha channel; they are composited on a white background.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# 16-bit PIL modes; their values are scaled from [0, 65535] to [0, 255]. Mode "I" (32-bit integers) is read
# the same way: PIL produces it mostly for 16-bit PNG/TIFF files.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_REMOTE_PREFIXES = ("http://", "https://", "data:image/")
_SUPPORTED_TYPES = (
    "PIL.Image.Image, numpy array, torch tensor, or a path to an image file (str or os.PathLike)"
)


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (is_torch_available() and isinstance(value, torch.Tensor))


def _is_single_image(value: Any) -> bool:
    """True for one image: a PIL image, a path, or a 2-D (H, W) / 3-D (HWC or CHW) array or tensor."""
    if isinstance(value, (PIL.Image.Image, str, os.PathLike)):
        return True
    return _is_array(value) and value.ndim in (2, 3)


def flatten_images(images: Any) -> tuple[list[Any], list[int] | None]:
    """Flatten `images` into a list of single images.

    Accepted layouts: one image; a list of images; a 4-D array or tensor `(b, h, w, c)` / `(b, c, h, w)`;
    or a nested list with one list of images per sample (a sample's list may be empty).

    Returns:
        `(flat, per_sample)`: the flat list of images and, for nested input, the number of images of
        each sample (`None` when the input was not nested).
    """
    if images is None:
        raise ValueError("`images` is None. Pass an image (" + _SUPPORTED_TYPES + ") or a list of images.")
    if _is_single_image(images):
        return [images], None
    if _is_array(images):
        if images.ndim == 4:
            return list(images), None
        raise ValueError(
            f"Got an image array of shape {tuple(images.shape)}. Expected (height, width), (height, width, channels), "
            "(channels, height, width), or a 4-D batch of such images."
        )
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"Unsupported image type {type(images).__name__}. Expected a {_SUPPORTED_TYPES}.")

    nested = [isinstance(item, (list, tuple)) for item in images]
    if any(nested) and not all(nested):
        raise ValueError(
            "`images` mixes single images and lists of images. Pass either a flat list of images or one list of "
            "images per sample."
        )
    if not all(nested):
        for index, image in enumerate(images):
            _check_single_image(image, f"images[{index}]")
        return list(images), None

    flat, per_sample = [], []
    for sample_index, sample in enumerate(images):
        for index, image in enumerate(sample):
            _check_single_image(image, f"images[{sample_index}][{index}]")
        flat.extend(sample)
        per_sample.append(len(sample))
    return flat, per_sample


def _check_single_image(image: Any, where: str) -> None:
    if image is None:
        raise ValueError(f"{where} is None. Every entry of `images` must be a {_SUPPORTED_TYPES}.")
    if not _is_single_image(image):
        if _is_array(image):
            raise ValueError(
                f"{where} has shape {tuple(image.shape)}. A single image must be 2-D (height, width) or 3-D "
                "(height, width, channels) / (channels, height, width)."
            )
        raise ValueError(
            f"{where} has unsupported type {type(image).__name__}. Expected a {_SUPPORTED_TYPES}."
        )


def _check_pixel_count(width: int, height: int, source: str) -> None:
    """Refuse images above `PIL.Image.MAX_IMAGE_PIXELS` (decompression-bomb guard), before decoding them."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ValueError(
            f"{source} is {width}x{height} = {width * height} pixels, above PIL's decompression-bomb limit "
            f"`PIL.Image.MAX_IMAGE_PIXELS` = {limit}. It was refused before decoding. If you trust this image, raise "
            "the limit (e.g. `PIL.Image.MAX_IMAGE_PIXELS = None` disables it) or downscale the image first."
        )


def load_image_file(path: str | os.PathLike) -> PIL.Image.Image:
    """Open an image file with PIL, refusing decompression bombs and non-image files with a clear error.

    The image keeps its mode (no RGB conversion here) and its EXIF orientation is applied.
    """
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if path.startswith(_REMOTE_PREFIXES):
        # URLs and base64 data go through transformers' loader, which converts them to RGB itself.
        try:
            return load_image(path)
        except (PIL.Image.DecompressionBombError, PIL.UnidentifiedImageError) as error:
            raise ValueError(f"Could not load the image at {path[:100]!r}: {error}") from error
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path!r}.")
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x MAX_IMAGE_PIXELS; `_check_pixel_count` turns that case into an error.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                _check_pixel_count(image.width, image.height, f"The image file {path!r}")
                image.load()
                image = PIL.ImageOps.exif_transpose(image)
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(
            f"The image file {path!r} was refused as a possible decompression bomb: {error} The limit is "
            f"`PIL.Image.MAX_IMAGE_PIXELS` = {PIL.Image.MAX_IMAGE_PIXELS}; raise it only for images you trust."
        ) from error
    except PIL.UnidentifiedImageError as error:
        raise ValueError(
            f"The file {path!r} is not an image that PIL can read (UnidentifiedImageError). Pass a PNG, JPEG, or "
            "another format supported by Pillow."
        ) from error
    except OSError as error:
        raise ValueError(
            f"The image file {path!r} could not be decoded ({error}); it may be truncated or corrupt."
        ) from error
    return image


def _check_size(height: int, width: int, source: str) -> None:
    if height == 0 or width == 0:
        raise ValueError(f"{source} is empty (height={height}, width={width}). Pass an image with pixels.")
    if height < MIN_IMAGE_SIDE or width < MIN_IMAGE_SIDE:
        raise ValueError(
            f"{source} is {height}x{width} pixels; images must be at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} to be "
            "resized meaningfully. Pass a larger image."
        )


def _to_uint8(values: np.ndarray, source: str) -> np.ndarray:
    """Map pixel values of any dtype to the 8-bit range [0, 255] (uint8).

    Rules: uint8 as is; bool -> {0, 255}; uint16 is 16-bit data, scaled by 255 / 65535; other integers must
    already lie in [0, 255]; floats must be finite and lie in [0, 1] (scaled by 255) or [0, 255].
    """
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if values.dtype == np.uint16:
        return np.round(values.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    if np.issubdtype(values.dtype, np.integer):
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{source} has integer pixel values in [{low}, {high}], outside [0, 255]. Pass uint8 data, uint16 "
                "data for 16-bit images, or floats in [0, 1]."
            )
        return values.astype(np.uint8)
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise ValueError(
                f"{source} contains NaN or infinite pixel values. Clean the image (e.g. `np.nan_to_num`) first."
            )
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 255.0:
            raise ValueError(
                f"{source} has float pixel values in [{low:.4g}, {high:.4g}]. Expected raw pixels in [0, 1] or "
                "[0, 255]; do not pass images that are already normalized."
            )
        scale = 255.0 if high <= 1.0 else 1.0
        return np.round(values.astype(np.float64) * scale).astype(np.uint8)
    raise ValueError(f"{source} has unsupported pixel dtype {values.dtype}.")


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) uint8 straight-alpha RGBA -> (h, w, 3) uint8 RGB over a white background."""
    alpha = rgba[..., 3:].astype(np.float64) / 255.0
    rgb = rgba[..., :3].astype(np.float64) * alpha + 255.0 * (1.0 - alpha)
    return np.round(rgb).astype(np.uint8)


def _channels_to_rgb(pixels: np.ndarray, source: str, require_rgb: bool = False) -> np.ndarray:
    """(h, w) or (h, w, c) uint8 with c in {1, 3, 4} -> (h, w, 3) uint8 RGB."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[-1]
    if require_rgb and channels != 3:
        raise ValueError(
            f"{source} has {channels} channel(s) and `do_convert_rgb=False`. Set `do_convert_rgb=True` or pass "
            "3-channel RGB images."
        )
    if channels == 1:
        return np.repeat(pixels, 3, axis=-1)
    if channels == 3:
        return pixels
    if channels == 4:
        return _composite_on_white(pixels)
    raise ValueError(
        f"{source} has {channels} channels. Expected 1 (grayscale), 3 (RGB), or 4 (RGBA, composited on white)."
    )


def pil_to_rgb(image: PIL.Image.Image, source: str = "The image") -> PIL.Image.Image:
    """Convert a PIL image of any common mode to 8-bit RGB.

    Alpha (RGBA, LA, P with transparency, ...) is composited on white; 16-bit modes (I;16*, I) are scaled from
    [0, 65535] to [0, 255]; float images (F) follow the float rule of `_to_uint8`; CMYK, YCbCr, L and 1-bit
    images use PIL's conversion.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return PIL.Image.fromarray(_composite_on_white(np.asarray(image.convert("RGBA"))))
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"{source} (mode {mode}) has values in [{low}, {high}]; 16-bit images must lie in [0, 65535]."
            )
        gray = np.round(values * (255.0 / 65535.0)).astype(np.uint8)
        return PIL.Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    if mode == "F":
        gray = _to_uint8(np.asarray(image), source)
        return PIL.Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(
            f"{source} has PIL mode {mode!r}, which cannot be converted to RGB: {error}"
        ) from error


def array_to_rgb(
    array: Any,
    input_data_format: ChannelDimension | str | None = None,
    source: str = "The image",
    require_rgb: bool = False,
) -> PIL.Image.Image:
    """Convert a numpy array or torch tensor image to an 8-bit RGB PIL image.

    Layout: (h, w) grayscale, or (h, w, c) / (c, h, w) with c in {1, 3, 4}; when both ends could be the channel
    axis, numpy arrays are read as channels-last and torch tensors as channels-first, unless
    `input_data_format` says otherwise. Values follow the dtype rules of `_to_uint8`. With `require_rgb`,
    anything but 3 channels is refused.
    """
    is_tensor = not isinstance(array, np.ndarray)
    if is_tensor:
        array = array.detach().cpu()
        if array.dtype in (torch.float16, torch.bfloat16):
            array = array.float()
        array = array.numpy()
    if array.size == 0:
        raise ValueError(f"{source} is empty (shape {tuple(array.shape)}). Pass an image with pixels.")
    if array.ndim == 3:
        layout = ChannelDimension(input_data_format) if input_data_format is not None else None
        if layout is None:
            first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
            if first and last:
                layout = ChannelDimension.FIRST if is_tensor else ChannelDimension.LAST
            elif first:
                layout = ChannelDimension.FIRST
            elif last:
                layout = ChannelDimension.LAST
            else:
                raise ValueError(
                    f"{source} has shape {tuple(array.shape)}: no axis of size 1, 3 or 4 to use as channels. Expected "
                    "(height, width, channels) or (channels, height, width) with 1 (grayscale), 3 (RGB) or 4 (RGBA) "
                    "channels."
                )
        if layout == ChannelDimension.FIRST:
            array = np.moveaxis(array, 0, -1)
    _check_size(array.shape[0], array.shape[1], source)
    return PIL.Image.fromarray(_channels_to_rgb(_to_uint8(array, source), source, require_rgb))


class VLMambaImageProcessor(PilBackend):
    r"""Image processor for VLM-Mamba (PIL/numpy backend).

    Each image is converted to 8-bit RGB, resized to exactly `size` (aspect ratio is not kept: the vision tower
    cuts the image into a fixed grid of patches, so every image, including one whose sides are not multiples of
    the patch size, is resized to the configured size), rescaled and normalized. Output: `pixel_values` of
    shape `(batch, 3, size["height"], size["width"])`, float32.

    Accepted inputs: PIL images, numpy arrays and torch tensors ((h, w), (h, w, c) or (c, h, w) with 1, 3 or 4
    channels; uint8, uint16 (16-bit), bool, other integers in [0, 255], floats in [0, 1] or [0, 255]), paths to
    image files (str or os.PathLike), URLs; one image, a list, a 4-D batch, or a nested list with one list per
    sample (flattened in order).

    RGB conversion: grayscale is replicated, alpha is composited on white, palette and CMYK use PIL's
    conversion, 16-bit images are scaled from [0, 65535] and float images from [0, 1] to [0, 255].

    Bad input raises `ValueError` naming the problem: `None`, empty or smaller than 2x2 images, NaN/inf pixels,
    wrong channel counts, files that are not images, and images above `PIL.Image.MAX_IMAGE_PIXELS` (refused
    before decoding; PIL's decompression-bomb guard).

    Args:
        size (`dict[str, int]`, defaults to `{"height": 224, "width": 224}`): output size.
        resample (`PILImageResampling`, defaults to `BICUBIC`): resampling filter of the resize.
        do_rescale (`bool`, defaults to `True`): multiply pixels by `rescale_factor`.
        rescale_factor (`float`, defaults to `1/255`): rescale factor.
        do_normalize (`bool`, defaults to `True`): subtract `image_mean`, divide by `image_std` (per channel).
        image_mean (`tuple[float, float, float]`, defaults to `(0.5, 0.5, 0.5)`): normalization mean.
        image_std (`tuple[float, float, float]`, defaults to `(0.5, 0.5, 0.5)`): normalization std.
        do_convert_rgb (`bool`, defaults to `True`): convert every image to RGB; when `False`, inputs must
            already be 3-channel RGB.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    size = DEFAULT_SIZE
    image_mean = DEFAULT_MEAN
    image_std = DEFAULT_STD
    default_to_square = True
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_center_crop = False
    do_pad = False

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Load paths (and URLs) to PIL images, keeping the nesting of the input; other inputs pass through."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike)):
            return load_image_file(image_url_or_urls)
        return image_url_or_urls

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list[Any]:
        flat, _ = flatten_images(self.fetch_images(images))
        if not flat:
            raise ValueError("`images` is an empty list. Pass at least one image.")
        return flat

    def process_image(
        self,
        image: Any,
        do_convert_rgb: bool | None = None,
        input_data_format: ChannelDimension | str | None = None,
        **kwargs: Unpack[ImagesKwargs],
    ) -> PIL.Image.Image:
        """Validate one image and convert it to an 8-bit RGB PIL image."""
        if isinstance(image, (str, os.PathLike)):
            image = load_image_file(image)
        if isinstance(image, PIL.Image.Image):
            source = f"The PIL image (mode {image.mode}, {image.width}x{image.height})"
            _check_size(image.height, image.width, source)
            _check_pixel_count(image.width, image.height, source)
            if not do_convert_rgb and image.mode != "RGB":
                raise ValueError(
                    f"{source} is not RGB and `do_convert_rgb=False`. Set `do_convert_rgb=True` or convert it first."
                )
            try:
                return pil_to_rgb(image, source)
            except OSError as error:  # lazily opened images are decoded here
                raise ValueError(
                    f"{source} could not be decoded ({error}); it may be truncated or corrupt."
                ) from error
        if _is_array(image):
            source = f"The image array of shape {tuple(image.shape)}"
            return array_to_rgb(image, input_data_format, source, require_rgb=not do_convert_rgb)
        raise ValueError(f"Unsupported image type {type(image).__name__}. Expected a {_SUPPORTED_TYPES}.")

    def _preprocess(
        self,
        images: list[PIL.Image.Image],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | int | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...] | None,
        image_std: float | tuple[float, ...] | None,
        return_tensors: str | TensorType | None,
        do_center_crop: bool | None = None,
        do_pad: bool | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        if do_center_crop or do_pad:
            raise ValueError(
                "VLMambaImageProcessor does not crop or pad: it resizes every image to `size`. Leave "
                "`do_center_crop` and `do_pad` unset."
            )
        if not (size is not None and size.height and size.width):
            raise ValueError(f'`size` must give "height" and "width" (e.g. {DEFAULT_SIZE}); got {size}.')
        target = (size.width, size.height)
        resample = PILImageResampling(resample if resample is not None else PILImageResampling.BICUBIC)
        mean = np.asarray(image_mean, dtype=np.float32).reshape(-1, 1, 1) if do_normalize else None
        std = np.asarray(image_std, dtype=np.float32).reshape(-1, 1, 1) if do_normalize else None

        pixel_values = []
        for image in images:
            if image.size != target:
                if not do_resize:
                    raise ValueError(
                        f"An image is {image.height}x{image.width} but the model needs {size.height}x{size.width} "
                        "and `do_resize=False`. Set `do_resize=True` or resize the images first."
                    )
                image = image.resize(target, resample=resample)
            values = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
            if do_rescale:
                values = values * np.float32(rescale_factor)
            if do_normalize:
                values = (values - mean) / std
            pixel_values.append(values.astype(np.float32))

        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)


__all__ = ["VLMambaImageProcessor"]
