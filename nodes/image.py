"""Image nodes: loading from the input folder, saving (PNG with the workflow in it) and previews, resizing,
cropping, inverting, batching, blank images, masked pasting and padding for outpainting.

IMAGE is float32 [B, H, W, C] in 0..1 on the CPU, MASK float32 [B, H, W] with 1 = the area to repaint
(nodes/values.py). Files are only ever read from the input folder and written into the output and temp
folders, through engine.paths.resolve_inside.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from engine import Boolean, Combo, ExecutionContext, Float, Hidden, Int, NodeResult, RunSettings, Socket, String, node
from engine.paths import UnsafePathError, list_files, resolve_inside
from nodes.latent import MAX_RESOLUTION, center_crop_to_aspect, mask_batch, upscale_samples

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo")
IMAGE_SCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
MASK_CHANNELS = ["alpha", "red", "green", "blue"]
_RGBA_INDEX = {"red": 0, "green": 1, "blue": 2, "alpha": 3}
#: ComfyUI's LoadImage mask when the picture has no alpha: a 64x64 zero mask, not one of the image's size.
NO_ALPHA_MASK_SIZE = 64
SAVE_COMPRESS_LEVEL = 4
PREVIEW_COMPRESS_LEVEL = 1


def image_batch(image: Any, name: str) -> Tensor:
    """An IMAGE input checked for its layout, or a clear error naming the input."""
    if not isinstance(image, Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{name}: an IMAGE must be a [B, H, W, C] tensor, got {shape}")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"{name}: the image batch is empty (shape {tuple(image.shape)})")
    return image


# --- loading ----------------------------------------------------------------------------------------------

def input_images(settings: RunSettings) -> list[str]:
    """The image files under the input folder (sub-folders included, as uploads may go there)."""
    return list_files(settings.input_dir, IMAGE_EXTENSIONS)


def _image_file_digest(constants: Mapping[str, Any], settings: RunSettings) -> str:
    # ComfyUI hashes the file too: a picture replaced under the same name must load again.
    return hashlib.sha256(resolve_inside(settings.input_dir, constants["image"]).read_bytes()).hexdigest()


def _open_input(settings: RunSettings, name: str) -> Image.Image:
    try:
        return Image.open(resolve_inside(settings.input_dir, name))
    except (OSError, UnsafePathError) as problem:
        raise ValueError(f"image: cannot open {name!r} in the input folder: {problem}") from problem


def _has_alpha(frame: Image.Image) -> bool:
    return "A" in frame.getbands() or "transparency" in frame.info


def _rgba(frame: Image.Image) -> np.ndarray:
    """A frame as float32 [H, W, 4] in 0..1, upright by its EXIF orientation; 16-bit frames keep 16 bits
    (ComfyUI scales them by 1/255 and clips, which whitens them)."""
    frame = ImageOps.exif_transpose(frame)
    if frame.mode.startswith("I"):
        grey = np.asarray(frame, dtype=np.float32) / 65535.0
        return np.dstack([grey, grey, grey, np.ones_like(grey)]).clip(0.0, 1.0)
    return np.asarray(frame.convert("RGBA"), dtype=np.float32) / 255.0


def _frames(picture: Image.Image) -> list[tuple[np.ndarray, bool]]:
    """Each frame of the first frame's size (ComfyUI drops the others) as (RGBA, has alpha); an MPO's later
    frames are camera extras (depth maps, previews), not an animation."""
    frames, first_size = [], picture.size
    for frame in [picture] if picture.format == "MPO" else ImageSequence.Iterator(picture):
        # The iterator seeks one Image object from frame to frame: convert each before moving on.
        if frame.size == first_size:
            frames.append((_rgba(frame), _has_alpha(frame)))
    return frames


@node(category="image", outputs=["IMAGE", "MASK"], fingerprint=_image_file_digest,
      description="Load an image from the input folder: every frame of the same size becomes one image of the "
                  "batch; the mask is 1 - alpha (a 64x64 zero mask without alpha, as ComfyUI).")
def LoadImage(image: Combo(input_images, image_upload=True), *, context: ExecutionContext) -> tuple:
    images, alphas = [], []
    with _open_input(context.settings, image) as picture:
        for rgba, has_alpha in _frames(picture):
            images.append(torch.from_numpy(rgba[..., :3].copy()))
            alphas.append(torch.from_numpy(1.0 - rgba[..., 3]) if has_alpha else None)
    if all(alpha is None for alpha in alphas):
        masks = torch.zeros(len(images), NO_ALPHA_MASK_SIZE, NO_ALPHA_MASK_SIZE)
    else:
        masks = torch.stack([torch.zeros(i.shape[:2]) if a is None else a for i, a in zip(images, alphas)])
    return torch.stack(images).float(), masks.float()


@node(category="mask", outputs=["MASK"], fingerprint=_image_file_digest,
      description="Load one channel of an image from the input folder as a mask (alpha is inverted: 1 - alpha).")
def LoadImageMask(image: Combo(input_images, image_upload=True), channel: Combo(MASK_CHANNELS),
                  *, context: ExecutionContext) -> tuple:
    with _open_input(context.settings, image) as picture:
        rgba = _rgba(picture)
    values = torch.from_numpy(rgba[..., _RGBA_INDEX[channel]].copy())
    return ((1.0 - values if channel == "alpha" else values).unsqueeze(0).float(),)


# --- saving -----------------------------------------------------------------------------------------------

def check_filename_prefix(constants: Mapping[str, Any]) -> str | None:
    prefix = constants.get("filename_prefix")
    if not isinstance(prefix, str):
        return None
    try:
        # Lexical checks only (absolute, '..', NUL): the real folder is checked again when saving.
        resolve_inside(Path("/sdgraph-prefix-check"), prefix or ".")
    except UnsafePathError as problem:
        return f"filename_prefix: {problem}; it must name a file inside the output folder"
    return None


_PREFIX_TOKEN = re.compile(r"%([^%]+)%")
_DATE_FIELD = re.compile(r"yyy?y?|MM?|dd?|hh?|mm?|ss?")


def expand_filename_prefix(prefix: str, *, width: int, height: int, prompt: Any,
                           now: datetime | None = None) -> str:
    """ComfyUI's prefix tokens: `%width%`, `%height%`, `%year%`, `%month%`, `%day%`, `%hour%`, `%minute%`,
    `%second%` (its server's) and `%date:yyyy-MM-dd%`, `%NodeName.input%` (its frontend's, done here so an
    API prompt run headless names its files the same). A node is found by class, else by title; unknown
    tokens and `%batch_num%` (per image, later) stay as written."""
    now = now or datetime.now()
    fields = {"width": width, "height": height, "year": now.year, "month": f"{now.month:02}",
              "day": f"{now.day:02}", "hour": f"{now.hour:02}", "minute": f"{now.minute:02}",
              "second": f"{now.second:02}"}

    def expand(match: re.Match) -> str:
        token = match.group(1)
        if token in fields:
            return str(fields[token])
        if token.startswith("date:"):
            return _DATE_FIELD.sub(lambda field: _date_field(field.group(0), now), token[len("date:"):])
        node_name, _, input_name = token.partition(".")
        value = _prompt_input(prompt, node_name, input_name) if input_name else None
        # A value must not add folders: its slashes become underscores, as in ComfyUI's frontend.
        return re.sub(r"[/\\]", "_", str(value)) if value is not None else match.group(0)
    return _PREFIX_TOKEN.sub(expand, prefix)


def _date_field(field: str, now: datetime) -> str:
    if field[0] == "y":
        return str(now.year)[-len(field):]
    value = {"M": now.month, "d": now.day, "h": now.hour, "m": now.minute, "s": now.second}[field[0]]
    return f"{value:0{len(field)}}"


def _prompt_input(prompt: Any, node_name: str, input_name: str) -> Any:
    if not isinstance(prompt, dict):
        return None
    bodies = [body for body in prompt.values() if isinstance(body, dict)]
    by_class = [b for b in bodies if b.get("class_type") == node_name]
    by_title = [b for b in bodies if (b.get("_meta") or {}).get("title") == node_name]
    for body in by_class + by_title:
        value = (body.get("inputs") or {}).get(input_name)
        if value is not None and not isinstance(value, (list, dict)):
            return value
    return None


def _pixels(image: Tensor) -> Image.Image:
    values = (torch.nan_to_num(image.float().cpu(), nan=0.0) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    if values.shape[-1] == 1:
        return Image.fromarray(values[..., 0], "L")
    if values.shape[-1] not in (3, 4):
        raise ValueError(f"images: {values.shape[-1]} channels cannot be saved as PNG (1, 3 or 4)")
    return Image.fromarray(values, "RGB" if values.shape[-1] == 3 else "RGBA")


def _metadata(prompt: Any, extra_pnginfo: Any) -> PngInfo:
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt, allow_nan=False))
    for key, value in (extra_pnginfo or {}).items() if isinstance(extra_pnginfo, dict) else ():
        info.add_text(key, json.dumps(value, allow_nan=False))
    return info


def next_file_counter(folder: Path, filename: str) -> int:
    """One past the highest counter among `{filename}_NNNNN_*` files (ComfyUI's numbering), else 1."""
    pattern = re.compile(re.escape(filename).replace(re.escape("%batch_num%"), r"\d+") + r"_(\d+)_")
    counters = [int(match.group(1)) for entry in folder.iterdir() if (match := pattern.match(entry.name))] \
        if folder.is_dir() else []
    return max(counters, default=0) + 1


def output_location(root: Path, expanded_prefix: str) -> tuple[Path, str, str]:
    """(folder, subfolder, file name stem) that an expanded filename_prefix names under `root`; the folder is
    created. A prefix leading outside `root` is a ValueError naming filename_prefix."""
    relative = PurePosixPath(expanded_prefix.replace("\\", "/"))
    subfolder = "" if str(relative.parent) == "." else str(relative.parent)
    try:
        folder = resolve_inside(root, subfolder or ".")
    except UnsafePathError as problem:
        raise ValueError(f"filename_prefix: {problem}; it must name a file inside the output folder") from None
    folder.mkdir(parents=True, exist_ok=True)
    return folder, subfolder, relative.name if relative.name != "." else ""


def write_new_file(folder: Path, name_for: Callable[[int], str], counter: int,
                   write: Callable[[BinaryIO], None]) -> tuple[str, int]:
    """Write a file that did not exist, named `name_for(counter)` with the counter moved past names taken in
    the meantime (another run may be saving too: nothing is ever overwritten); (name, next counter)."""
    while True:
        name = name_for(counter)
        counter += 1
        try:
            with open(folder / name, "xb") as target:
                write(target)
            return name, counter
        except FileExistsError:
            continue


def save_images(images: Any, root: Path, prefix: str, folder_type: str, compress_level: int, prompt: Any,
                extra_pnginfo: Any) -> list[dict[str, str]]:
    """Write each image as `{prefix}_{counter:05}_.png` under `root` (the prefix may name sub-folders) with
    the prompt and extra_pnginfo as PNG text chunks; the ui entries that name the files."""
    batch = image_batch(images, "images")
    height, width = batch.shape[1:3]
    expanded = expand_filename_prefix(prefix, width=width, height=height, prompt=prompt)
    folder, subfolder, filename = output_location(root, expanded)
    metadata = _metadata(prompt, extra_pnginfo)
    counter = next_file_counter(folder, filename)
    saved = []
    for batch_number, image in enumerate(batch):
        picture = _pixels(image)
        stem = filename.replace("%batch_num%", str(batch_number))
        name, counter = write_new_file(
            folder, lambda number: f"{stem}_{number:05}_.png", counter,
            lambda target: picture.save(target, "PNG", pnginfo=metadata, compress_level=compress_level))
        saved.append({"filename": name, "subfolder": subfolder, "type": folder_type})
    return saved


@node(category="image", output_node=True, validate=check_filename_prefix,
      description="Save the images to the output folder as PNG files carrying the workflow.")
def SaveImage(images: Socket("IMAGE", tooltip="The images to save."),
              filename_prefix: String("ComfyUI", tooltip="The prefix for the file to save. This may include "
                                      "formatting information such as %date:yyyy-MM-dd% or "
                                      "%Empty Latent Image.width% to include values from nodes."),
              prompt: Hidden("PROMPT"), extra_pnginfo: Hidden("EXTRA_PNGINFO"), *,
              context: ExecutionContext) -> NodeResult:
    saved = save_images(images, context.settings.output_dir, filename_prefix, "output", SAVE_COMPRESS_LEVEL,
                        prompt, extra_pnginfo)
    return NodeResult(ui={"images": saved})


@node(category="image", output_node=True, description="Preview the images (saved to the temp folder).")
def PreviewImage(images: Socket("IMAGE"), prompt: Hidden("PROMPT"), extra_pnginfo: Hidden("EXTRA_PNGINFO"), *,
                 context: ExecutionContext) -> NodeResult:
    suffix = "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
    saved = save_images(images, context.settings.temp_dir, f"ComfyUI_temp_{suffix}", "temp",
                        PREVIEW_COMPRESS_LEVEL, prompt, extra_pnginfo)
    return NodeResult(ui={"images": saved})


# --- transforms -------------------------------------------------------------------------------------------

def scale_image(image: Tensor, width: int, height: int, method: str, crop: str = "disabled") -> Tensor:
    """[B, H, W, C] resized to width x height; lanczos goes through Pillow at 8 bits, as in ComfyUI."""
    channels_first = image.movedim(-1, 1)
    if method != "lanczos":
        return upscale_samples(channels_first, width, height, method, crop).movedim(1, -1)
    if crop == "center":
        channels_first = center_crop_to_aspect(channels_first, width, height)
    resized = [_pixels(picture.movedim(0, -1)).resize((width, height), Image.Resampling.LANCZOS)
               for picture in channels_first]
    return torch.stack([torch.from_numpy(np.array(p, dtype=np.float32) / 255.0) for p in resized]) \
        .reshape(len(resized), height, width, -1)


@node(category="image/upscaling", outputs=["IMAGE"])
def ImageScale(image: Socket("IMAGE"), upscale_method: Combo(IMAGE_SCALE_METHODS),
               width: Int(512, min=0, max=MAX_RESOLUTION, step=1),
               height: Int(512, min=0, max=MAX_RESOLUTION, step=1), crop: Combo(["disabled", "center"])) -> tuple:
    """Resize to width x height; a side of 0 keeps the aspect ratio from the other (both 0: unchanged)."""
    image = image_batch(image, "image")
    if width == 0 and height == 0:
        return (image,)
    old_height, old_width = image.shape[1:3]
    width = width or max(1, round(old_width * height / old_height))
    height = height or max(1, round(old_height * width / old_width))
    return (scale_image(image, width, height, upscale_method, crop),)


@node(category="image/upscaling", outputs=["IMAGE"])
def ImageScaleBy(image: Socket("IMAGE"), upscale_method: Combo(IMAGE_SCALE_METHODS),
                 scale_by: Float(1.0, min=0.01, max=8.0, step=0.01)) -> tuple:
    image = image_batch(image, "image")
    width, height = round(image.shape[2] * scale_by), round(image.shape[1] * scale_by)
    if width < 1 or height < 1:
        raise ValueError(f"scale_by: {scale_by} shrinks the {image.shape[2]}x{image.shape[1]} image to nothing")
    return (scale_image(image, width, height, upscale_method),)


@node(category="image", outputs=["IMAGE"])
def ImageInvert(image: Socket("IMAGE")) -> tuple:
    return (1.0 - image_batch(image, "image"),)


@node(category="image", outputs=["IMAGE"])
def ImageBatch(image1: Socket("IMAGE"), image2: Socket("IMAGE")) -> tuple:
    """image2 after image1; image2 is resized (bilinear, centre crop) to image1's size, as ComfyUI does."""
    first, second = image_batch(image1, "image1"), image_batch(image2, "image2")
    if first.shape[-1] != second.shape[-1]:
        raise ValueError(f"image2: {second.shape[-1]} channels cannot join image1's {first.shape[-1]}")
    if first.shape[1:3] != second.shape[1:3]:
        second = scale_image(second, first.shape[2], first.shape[1], "bilinear", "center")
    return (torch.cat([first, second.to(first.dtype)]),)


def _outpaint_feather(height: int, width: int, feathering: int, top: int, bottom: int, left: int,
                      right: int) -> Tensor:
    """The mask over the original picture: (1 - d / feathering)^2 within `feathering` pixels of each padded
    edge (d the distance to it), 0 beyond; ComfyUI leaves it all 0 when the picture is too small to feather."""
    if feathering <= 0 or feathering * 2 >= height or feathering * 2 >= width:
        return torch.zeros(height, width)
    rows = torch.arange(height, dtype=torch.float32).unsqueeze(1)
    cols = torch.arange(width, dtype=torch.float32).unsqueeze(0)
    far_rows, far_cols = torch.full_like(rows, height), torch.full_like(cols, width)
    distance = torch.minimum(
        torch.minimum(rows if top else far_rows, height - rows if bottom else far_rows),
        torch.minimum(cols if left else far_cols, width - cols if right else far_cols))
    ramp = ((feathering - distance) / feathering).clamp(min=0.0)
    return ramp * ramp


@node(category="image", outputs=["IMAGE", "MASK"],
      description="Pad the image for outpainting: grey (0.5) borders, and a mask that is 1 on them and fades "
                  "into the picture over `feathering` pixels.")
def ImagePadForOutpaint(image: Socket("IMAGE"), left: Int(0, min=0, max=MAX_RESOLUTION, step=8),
                        top: Int(0, min=0, max=MAX_RESOLUTION, step=8),
                        right: Int(0, min=0, max=MAX_RESOLUTION, step=8),
                        bottom: Int(0, min=0, max=MAX_RESOLUTION, step=8),
                        feathering: Int(40, min=0, max=MAX_RESOLUTION, step=1)) -> tuple:
    image = image_batch(image, "image")
    batch, height, width, channels = image.shape
    padded = torch.full((batch, height + top + bottom, width + left + right, channels), 0.5, dtype=image.dtype)
    padded[:, top:top + height, left:left + width] = image
    mask = torch.ones(height + top + bottom, width + left + right)
    mask[top:top + height, left:left + width] = _outpaint_feather(height, width, feathering, top, bottom, left,
                                                                  right)
    return padded, mask.unsqueeze(0)


@node(category="image/transform", outputs=["IMAGE"])
def ImageCrop(image: Socket("IMAGE"), width: Int(512, min=1, max=MAX_RESOLUTION, step=1),
              height: Int(512, min=1, max=MAX_RESOLUTION, step=1), x: Int(0, min=0, max=MAX_RESOLUTION, step=1),
              y: Int(0, min=0, max=MAX_RESOLUTION, step=1)) -> tuple:
    """The width x height region from (x, y), cut short at the image's edges; an offset past an edge
    moves back onto the last row or column, as ComfyUI's does."""
    image = image_batch(image, "image")
    x, y = min(x, image.shape[2] - 1), min(y, image.shape[1] - 1)
    return (image[:, y:y + height, x:x + width],)


@node(category="image/batch", outputs=["IMAGE"])
def RepeatImageBatch(image: Socket("IMAGE"), amount: Int(1, min=1, max=4096)) -> tuple:
    return (image_batch(image, "image").repeat(amount, 1, 1, 1),)


@node(category="image/batch", outputs=["IMAGE"])
def ImageFromBatch(image: Socket("IMAGE"), batch_index: Int(0, min=0, max=4095),
                   length: Int(1, min=1, max=4096)) -> tuple:
    """`length` images from `batch_index`, both clamped to the batch (ComfyUI's behaviour)."""
    image = image_batch(image, "image")
    start = min(batch_index, image.shape[0] - 1)
    return (image[start:start + min(length, image.shape[0] - start)].clone(),)


@node(category="image", outputs=["IMAGE"])
def EmptyImage(width: Int(512, min=1, max=MAX_RESOLUTION, step=1), height: Int(512, min=1, max=MAX_RESOLUTION, step=1),
               batch_size: Int(1, min=1, max=4096),
               color: Int(0, min=0, max=0xFFFFFF, step=1, extra={"display": "color"})) -> tuple:
    """A batch of one colour, given as 0xRRGGBB."""
    rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=torch.float32) / 255.0
    return (rgb.expand(batch_size, height, width, 3).clone(),)


def repeat_to_batch(values: Tensor, size: int) -> Tensor:
    """The first `size` items of `values` repeated as often as needed (ComfyUI's batch matching)."""
    return values.repeat(math.ceil(size / values.shape[0]), *[1] * (values.dim() - 1))[:size]


@node(category="image", outputs=["IMAGE"])
def ImageCompositeMasked(destination: Socket("IMAGE"), source: Socket("IMAGE"),
                         x: Int(0, min=0, max=MAX_RESOLUTION, step=1), y: Int(0, min=0, max=MAX_RESOLUTION, step=1),
                         resize_source: Boolean(False), mask: Socket("MASK", optional=True) = None) -> tuple:
    """`source` pasted onto `destination` with its top-left corner at (x, y), blended by `mask` (resized to
    the source, bilinear) where given, clipped at the destination's edges."""
    destination, source = image_batch(destination, "destination"), image_batch(source, "source")
    if destination.shape[-1] != source.shape[-1]:
        raise ValueError(f"source: {source.shape[-1]} channels cannot paste onto {destination.shape[-1]}")
    result = destination.clone()
    height, width = destination.shape[1:3]
    if resize_source:
        source = scale_image(source, width, height, "bilinear")
    source = repeat_to_batch(source, destination.shape[0])
    if mask is None:
        weight = torch.ones_like(source[..., :1])
    else:
        masks = F.interpolate(mask_batch(mask, "mask").unsqueeze(1), size=source.shape[1:3], mode="bilinear")
        weight = repeat_to_batch(masks, source.shape[0]).movedim(1, -1)
    x, y = min(x, width), min(y, height)
    bottom, right = min(y + source.shape[1], height), min(x + source.shape[2], width)
    source, weight = source[:, :bottom - y, :right - x], weight[:, :bottom - y, :right - x]
    region = result[:, y:bottom, x:right]
    result[:, y:bottom, x:right] = weight * source + (1.0 - weight) * region
    return (result,)

