"""Augment whole batches on the device: crop, flip, rotation, colour jitter and erasing.

torchvision.transforms.v2 has every one of these, but per sample: a batch with a different random
crop, angle and jitter per image becomes a Python loop of small ops, tolerable in DataLoader
workers and slow on a GPU. Here each sample's crop, flip and rotation become one affine matrix,
resampled for the whole batch bilinearly (`F.grid_sample`, or the same computed from gathers where
compiled); jitter and normalisation become one 3x3 colour matrix per sample; erasing is a broadcast
mask. Every random number comes from the caller's generator on the batch's device, and nothing
reads a value back to the host, so a training step never waits for the GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from src.config import AugmentConfig
from src.data.decode import cache_size_for

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601 luma, as torchvision's rgb_to_grayscale; the weights sum to 1.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
UNIFORMS_PER_SAMPLE = 14  # the random numbers one sample's augmentation consumes
ERASE_AREA = (0.02, 0.2)
ERASE_LOG_RATIO = (math.log(0.3), math.log(3.3))  # torchvision RandomErasing's default ratio
# Pixel values 0 and 1 after normalisation, per channel: the clipping bounds of colour jitter.
NORMALISED_RANGE = tuple((-m / s, (1 - m) / s) for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
# On the CPU a batch is processed in slices whose float input stays under this size: glibc hands
# blocks over 32 MB back to the OS when freed, so full-batch temporaries at 224 px (38-50 MB) would
# be page-faulted in afresh at every step, ~2.5x the cost of the arithmetic. GPUs take the whole
# batch at once (the caching allocator reuses memory, and fewer launches is what counts there).
CPU_SLICE_BYTES = 8 << 20


class Constants(NamedTuple):
    """Colour constants on one device (3 values each)."""

    gray: torch.Tensor  # luma weights
    inv_std: torch.Tensor  # 1 / ImageNet std
    scale: torch.Tensor  # 1 / (255 std): a uint8 value to its normalised one (after the shift)
    shift: torch.Tensor  # -mean / std: what 0 becomes after normalisation


@dataclass
class AugmentParams:
    """Per-sample random parameters of one batch (all tensors of length N on the batch's device)."""

    area: torch.Tensor
    """Crop area as a fraction of the input image, in [crop_scale_min, 1]."""
    log_ratio: torch.Tensor
    """log(crop width / crop height), within log(3/4)..log(4/3)."""
    centre: torch.Tensor
    """N x 2 crop centre (x, y) in grid_sample coordinates (-1..1); the crop stays inside."""
    angle: torch.Tensor
    """Rotation in radians."""
    flip: torch.Tensor
    """bool: mirror left-right."""
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    erase: torch.Tensor
    """bool: erase one rectangle."""
    erase_box: torch.Tensor
    """N x 4 (top, left, height, width) of the rectangle as fractions of the output side."""

    def __getitem__(self, index: slice) -> AugmentParams:
        return AugmentParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


class BatchAugment:
    """Training augmentation and eval preprocessing of uint8 `N x H x W x 3` batches on any device.

    A plain class, not an nn.Module: it has no parameters, and its `train` / `eval` would shadow
    the module methods of the same names.
    """

    def __init__(self, augment: AugmentConfig, image_size: int, dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.channels_last):
        """`dtype`: of the output. Under bf16 autocast the model's first convolution casts its input
        to bf16 anyway; writing bf16 here spares that pass and halves the output's bytes.
        `memory_format`: of the output; channels_last is the cache's own NHWC order, and convolutions
        run in the layout of their input whatever the weights' (`trainer.channels_last`)."""
        self.augment = augment
        self.image_size = image_size
        self.dtype = dtype
        self.memory_format = memory_format
        self._constants: dict[torch.device, Constants] = {}

    # --- public --------------------------------------------------------------------------------

    def draw(self, n: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
        """Every random number of a batch, N x UNIFORMS_PER_SAMPLE, in one call on `device`."""
        return torch.rand(n, UNIFORMS_PER_SAMPLE, generator=generator, device=device)

    def sample_params(self, n: int, generator: torch.Generator,
                      device: torch.device | str) -> AugmentParams:
        return self.params_from_uniform(self.draw(n, generator, device))

    def params_from_uniform(self, u: torch.Tensor) -> AugmentParams:
        """Per-sample parameters from a row of uniforms each (deterministic, no host round trip)."""
        a = self.augment
        area = a.crop_scale_min + (1 - a.crop_scale_min) * u[:, 0]
        # torchvision's RandomResizedCrop rejects crops that do not fit and retries; instead the
        # aspect ratio is drawn from the range that fits at this area (w = sqrt(area * r) <= 1 and
        # h = sqrt(area / r) <= 1), so the area stays exactly uniform and no loop is needed.
        low = area.log().clamp(min=CROP_LOG_RATIO[0])
        high = (-area.log()).clamp(max=CROP_LOG_RATIO[1])
        log_ratio = low + (high - low) * u[:, 1]
        width, height = _crop_sides(area, log_ratio)
        centre = torch.stack([1 - width, 1 - height], dim=1) * (2 * u[:, 2:4] - 1)
        jitter = 1 + a.color_jitter * (2 * u[:, 6:9] - 1)
        erase_area = ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u[:, 9]
        erase_log_ratio = ERASE_LOG_RATIO[0] + (ERASE_LOG_RATIO[1] - ERASE_LOG_RATIO[0]) * u[:, 10]
        erase_w, erase_h = _crop_sides(erase_area, erase_log_ratio)  # both <= sqrt(0.2 * 3.3) < 1
        erase_box = torch.stack([(1 - erase_h) * u[:, 12], (1 - erase_w) * u[:, 13],
                                 erase_h, erase_w], dim=1)
        return AugmentParams(
            area=area, log_ratio=log_ratio, centre=centre,
            angle=math.radians(a.rotation_degrees) * (2 * u[:, 4] - 1),
            flip=u[:, 5] < a.hflip,
            brightness=jitter[:, 0], contrast=jitter[:, 1], saturation=jitter[:, 2],
            erase=u[:, 11] < a.random_erasing, erase_box=erase_box)

    def train(self, batch_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augmented `N x 3 x image_size x image_size` of `dtype`, normalised, in `memory_format`."""
        return self.apply_uniform(batch_u8, self.draw(batch_u8.shape[0], generator, batch_u8.device))

    def apply_uniform(self, batch_u8: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """`train` from the batch's rows of `draw`: the training loop calls this (one graph when
        compiled, the random draw outside it, since torch.compile does not take generators)."""
        return self.apply(batch_u8, self.params_from_uniform(uniform))

    def apply(self, batch_u8: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """`train` with given parameters."""
        return self._sliced(batch_u8, lambda part: self._augment(batch_u8[part], params[part]))

    def eval(self, batch_u8: torch.Tensor) -> torch.Tensor:
        """Deterministic: the centre image_size/cache_size of the image, resized to image_size.

        On a cache made for this image_size the crop already has the output size, so this is a
        crop and a normalisation, no resampling (as ImageNet's Resize(256) + CenterCrop(224)).
        """
        height, width = batch_u8.shape[1:3]
        side = round(min(height, width) * self.image_size / cache_size_for(self.image_size))
        # torchvision's center_crop offsets, so eval matches it pixel for pixel.
        top, left = int(round((height - side) / 2)), int(round((width - side) / 2))
        crop = batch_u8[:, top:top + side, left:left + side]
        return self._sliced(batch_u8, lambda part: self._centre(crop[part]))

    # --- steps ---------------------------------------------------------------------------------

    def _sliced(self, batch_u8: torch.Tensor,
                compute: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """Output of `dtype` in `memory_format`, computed by `compute` one slice of the batch at a time.

        `compute` returns N x 3 x H x W of any layout and dtype; the output is made `memory_format` and
        `dtype` from it (no copy where it already is).
        """
        _check_batch(batch_u8)
        n, height, width = batch_u8.shape[:3]
        step = n
        if batch_u8.device.type == "cpu":
            step = max(1, CPU_SLICE_BYTES // (3 * height * width * 4))
        # Autocast would run the colour arithmetic in bf16 and change the result; it is cheap in fp32.
        with torch.autocast(batch_u8.device.type, enabled=False):
            if step >= n:
                return compute(slice(None)).to(self.dtype, memory_format=self.memory_format)
            out = torch.empty((n, 3, self.image_size, self.image_size), dtype=self.dtype,
                              device=batch_u8.device, memory_format=self.memory_format)
            for start in range(0, n, step):
                out[start:start + step] = compute(slice(start, start + step))  # the copy converts
            return out

    def _augment(self, batch_u8: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """N x 3 x S x S float (S = image_size), of any memory layout.

        Crop, flip and rotation resample bilinearly with reflection padding, as
        `F.grid_sample(..., padding_mode="reflection", align_corners=False)`: reflection fills the
        corners a rotation uncovers with face-like texture, not a flat edge. Two ways to the same
        pixels (tested equal), one for each way of running:
        - eagerly (the CPU), library kernels: grid_sample, then the colour and erasing in place;
        - compiled (the GPU), `_fused`: one functional expression of gathers from the uint8 batch,
          which inductor fuses into few passes. Compiled, grid_sample became a kernel of its own
          that read a float copy of the input (on an H100, 200 us per batch of 128 at 224 px), with
          two more passes for colour (56 us) and clipping, erasing and layout (80 us). Run eagerly,
          the gathers' many separate passes are ~6x slower (56 against 8-9 ms for the whole
          augmentation of 64 images at 112 px on 2 cores).

        The cache is ~8/7 of the output side, so the largest downscale is ~1.14x and bilinear
        sampling barely aliases; with a cache much larger than the output (e.g. 512 to 112) it
        would, and an antialiasing resize should come first.
        """
        height, width = batch_u8.shape[1:3]
        grid = affine_grid(crop_affine(params, height, width), self.image_size)
        matrix, offset = self._colour_matrix(_mean_colour(batch_u8), params)
        kept = ~self._erased(params)
        if torch.compiler.is_compiling():
            return _fused(batch_u8, grid, matrix, offset, kept, self.dtype)
        sampled = F.grid_sample(_to_float_nchw(batch_u8), grid, mode="bilinear", padding_mode="reflection",
                                align_corners=False)
        out = torch.addcmul(offset[:, :, None, None], matrix[:, :, 0, None, None], sampled[:, None, 0])
        out.addcmul_(matrix[:, :, 1, None, None], sampled[:, None, 1])
        out.addcmul_(matrix[:, :, 2, None, None], sampled[:, None, 2])
        for channel, (low, high) in enumerate(NORMALISED_RANGE):
            out[:, channel].clamp_(low, high)  # scalar bounds: ~4x faster than tensor bounds on the CPU
        # Multiplying by a float mask is several times faster on the CPU than masked_fill_.
        return out.mul_(kept.to(out.dtype)[:, None])

    def _centre(self, crop_u8: torch.Tensor) -> torch.Tensor:
        pixels = _to_float_nchw(crop_u8)
        if pixels.shape[-1] != self.image_size:
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size),
                                   mode="bilinear", antialias=True, align_corners=False)
        constants = self._device_constants(crop_u8.device)
        return torch.addcmul(constants.shift.view(1, 3, 1, 1), pixels, constants.scale.view(1, 3, 1, 1))

    def _device_constants(self, device: torch.device) -> Constants:
        """The colour constants on `device`, copied there once. Traced by torch.compile, they are built
        in the graph instead (inductor folds them into its kernels): a cache that the compiled function
        filled was a guard that failed at its second call, which compiled it again."""
        if torch.compiler.is_compiling():
            return _colour_constants(device)
        if device not in self._constants:
            self._constants[device] = _colour_constants(device)
        return self._constants[device]

    def _colour_matrix(self, image_mean: torch.Tensor,
                       params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Brightness, contrast, saturation, /255 and ImageNet normalisation as one affine colour
        map per sample: N x 3 x 3 matrices (out x in) and N x 3 offsets.

        With factors b, c, s, luma weights g and the image's mean luma m:
        brightness x -> b x; contrast -> c b x + (1 - c) b m; saturation blends with the luma.
        Together: x -> c b (s I + (1 - s) 1 g^T) x + (1 - c) b m, linear per sample. torchvision
        applies the three in random order and clips to [0, 1] after each; here the order is fixed
        and the result is clipped once, so the whole jitter is 9 multiply-adds per pixel.

        `image_mean` (N x 3, 0..255) is the mean colour of the whole uncropped image, where
        torchvision's contrast takes the crop's: a cheap reduction over the uint8 batch, where the
        crop's mean was a reduction fused into the resampling (on an H100, 220 us per batch of 128
        at 224 px against 200 us for the resampling alone). The matrix is applied as multiply-adds,
        not a batched matmul: pointwise work that fuses with its neighbours when compiled, where the
        matmul took 271 us.
        """
        gray, inv_std, scale, shift = self._device_constants(image_mean.device)
        b, c, s = params.brightness, params.contrast, params.saturation
        mean_luma = image_mean @ gray / 255  # N, in 0..1
        eye = torch.eye(3, device=image_mean.device)
        colour = (c * b)[:, None, None] * (s[:, None, None] * eye
                                           + (1 - s)[:, None, None] * gray.expand(3, 3))
        matrix = colour * scale[None, :, None]  # row i scaled by 1/(255 std) of channel i
        offset = ((1 - c) * b * mean_luma)[:, None] * inv_std + shift
        return matrix, offset

    def _erased(self, params: AugmentParams) -> torch.Tensor:
        """N x S x S bool: the one rectangle erased (set to the mean colour, 0 after normalisation)
        in each selected sample."""
        size = self.image_size
        centres = (torch.arange(size, device=params.erase_box.device) + 0.5) / size  # pixel centres, 0..1
        top, left, height, width = params.erase_box.unbind(1)
        rows = (centres >= top[:, None]) & (centres < (top + height)[:, None])  # N x size
        cols = (centres >= left[:, None]) & (centres < (left + width)[:, None])
        return params.erase[:, None, None] & rows[:, :, None] & cols[:, None, :]


def crop_affine(params: AugmentParams, height: int, width: int) -> torch.Tensor:
    """N x 2 x 3 matrices mapping output grid coordinates (-1..1) to input ones (F.affine_grid).

    Output point u maps to centre + D^-1 R D S u: S scales to the crop's half sides (negative x
    for a flip), D converts grid units to pixels so that R is a true rotation on a non-square
    image. On a square image |det| of the 2 x 2 part is the crop's area fraction.
    """
    crop_w, crop_h = _crop_sides(params.area, params.log_ratio)
    crop_w = torch.where(params.flip, -crop_w, crop_w)
    cos, sin = params.angle.cos(), params.angle.sin()
    return torch.stack([
        torch.stack([cos * crop_w, -sin * crop_h * (height / width), params.centre[:, 0]], dim=1),
        torch.stack([sin * crop_w * (width / height), cos * crop_h, params.centre[:, 1]], dim=1),
    ], dim=1)


def affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """`F.affine_grid(theta, (N, C, size, size), align_corners=False)`, computed separably.

    F.affine_grid fills a base grid per sample and runs a batched matmul over it; since the grid is
    x-part + y-part, two small per-sample tables and one broadcast add give the same in one pass
    (on the CPU at 112 px: ~1.2 ms for 64 samples instead of ~5 ms).
    """
    steps = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1
    along_x = steps[None, :, None] * theta[:, None, :, 0] + theta[:, None, :, 2]  # N x size x 2
    along_y = steps[None, :, None] * theta[:, None, :, 1]
    return along_y[:, :, None, :] + along_x[:, None, :, :]  # N x size(y) x size(x) x 2


def _reflect(coordinate: torch.Tensor, side: int) -> torch.Tensor:
    """A grid coordinate (-1..1 spans the image) in input pixels (centres at 0..side-1), with
    grid_sample's reflection padding (align_corners=False): mirrored at the image's outer edges,
    pixel -0.5 and side - 0.5, as often as needed, then clipped to the pixel centres."""
    distance = ((coordinate + 1) * (side / 2)).abs()  # from the outer edge at pixel -0.5
    flips = (distance / side).floor()
    within = distance - flips * side
    reflected = torch.where(flips.remainder(2) == 0, within, side - within)
    return (reflected - 0.5).clamp(0, side - 1)


def _fused(batch_u8: torch.Tensor, grid: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor,
           kept: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The compiled path of `BatchAugment._augment`: N x 3 x S x S of `dtype`, channels_last, each
    output pixel from the four uint8 pixels around its position in the input, as one functional
    expression per channel plane.

    Written for inductor's fusion: no in-place steps, which would cut it into separate passes. On an
    H100 and an H200 it compiled to two large kernels (98 and 91 us per batch of 128 at 224 px): the
    first computes the coordinates, gathers and interpolates, and stores five float planes of partial
    colour sums; the second, the final stack, reads them back to write the channels. One pass
    without those planes (Inductor's realisation thresholds raised) had not compiled after 200 s on
    an H200, so the two kernels stay.
    """
    n, height, width, _ = batch_u8.shape
    x, y = _reflect(grid[..., 0], width), _reflect(grid[..., 1], height)
    # The top-left neighbour, at most the second-to-last pixel, so that all four are inside the
    # image: at x = width - 1 the right neighbour's weight is then 1 instead of 0, the same value.
    left, top = x.floor().clamp(max=width - 2), y.floor().clamp(max=height - 2)
    x_weight, y_weight = x - left, y - top
    image = torch.arange(n, device=batch_u8.device)[:, None, None]
    start = ((image * height + top.long()) * width + left.long()) * 3  # its first byte in the NHWC batch
    flat, row = batch_u8.reshape(-1), 3 * width

    def sample(channel: int) -> torch.Tensor:  # N x S x S, 0..255
        at = start + channel
        upper = torch.lerp(flat[at].float(), flat[at + 3].float(), x_weight)
        lower = torch.lerp(flat[at + row].float(), flat[at + row + 3].float(), x_weight)
        return torch.lerp(upper, lower, y_weight)

    sampled = [sample(channel) for channel in range(3)]
    planes = []
    for channel, (low, high) in enumerate(NORMALISED_RANGE):
        weights = matrix[:, channel, :, None, None]
        value = (offset[:, channel, None, None] + weights[:, 0] * sampled[0] + weights[:, 1] * sampled[1]
                 + weights[:, 2] * sampled[2])
        planes.append((value.clamp(low, high) * kept).to(dtype))
    return torch.stack(planes, dim=-1).permute(0, 3, 1, 2)


def _colour_constants(device: torch.device) -> Constants:
    mean = torch.tensor(IMAGENET_MEAN, device=device)
    std = torch.tensor(IMAGENET_STD, device=device)
    return Constants(torch.tensor(GRAY_WEIGHTS, device=device), 1 / std, 1 / (255 * std), -mean / std)


def _mean_colour(batch_u8: torch.Tensor) -> torch.Tensor:
    """N x 3 mean colour (0..255) of each image, estimated from every 4th row and column: 1/16 of
    the pixels (4,096 of a 256 x 256 image) is far more than a mean needs, and reading them all
    took 37 us per batch of 128 at 224 px on an H100."""
    return batch_u8[:, ::4, ::4].float().mean(dim=(1, 2))


def _crop_sides(area: torch.Tensor, log_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(width, height) as fractions of the image side for a given area fraction and log aspect."""
    ratio = log_ratio.exp()
    return (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)


def _check_batch(batch_u8: torch.Tensor) -> None:
    if batch_u8.dtype != torch.uint8 or batch_u8.dim() != 4 or batch_u8.shape[3] != 3 or min(batch_u8.shape[1:3]) < 2:
        raise ValueError(f"expected a uint8 N x H x W x 3 batch of images at least 2 x 2, got {batch_u8.dtype} "
                         f"{tuple(batch_u8.shape)}")


def _to_float_nchw(batch_u8: torch.Tensor) -> torch.Tensor:
    """float32 N x 3 x H x W view of an NHWC batch: a channels_last tensor, no transpose copy."""
    return batch_u8.permute(0, 3, 1, 2).float()
