"""Batch augmentation: layout, determinism, and statistics that match the config."""
from __future__ import annotations

import dataclasses
import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch._dynamo.testing import CompileCounter

from src.config import AugmentConfig
from src.data import augment
from src.data.augment import IMAGENET_MEAN, IMAGENET_STD, BatchAugment, affine_grid, crop_affine
from src.data.decode import cache_size_for

NO_AUGMENT = dict(crop_scale_min=1.0, hflip=0.0, color_jitter=0.0, rotation_degrees=0.0,
                  random_erasing=0.0)


def _batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normalise(image01: torch.Tensor) -> torch.Tensor:
    return TF.normalize(image01, list(IMAGENET_MEAN), list(IMAGENET_STD))


def _binomial_ok(count: int, n: int, p: float) -> bool:
    """Within 4.5 standard deviations: a false failure about once in 150,000 runs."""
    return abs(count - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("image_size", [32, 48])
def test_outputs_are_normalised_float_channels_last(image_size):
    aug = BatchAugment(AugmentConfig(), image_size)
    batch = _batch(6, cache_size_for(image_size))
    for out in (aug.train(batch, _generator(0)), aug.eval(batch)):
        assert out.shape == (6, 3, image_size, image_size)
        assert out.dtype == torch.float32
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert out.min() >= min(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)) - 1e-5


def test_train_is_deterministic_given_the_generator_seed():
    aug = BatchAugment(AugmentConfig(), 32)
    batch = _batch(8, 37)
    first = aug.train(batch, _generator(1))
    assert torch.equal(first, aug.train(batch, _generator(1)))
    assert not torch.allclose(first, aug.train(batch, _generator(2)))


def test_output_under_autocast_is_the_float32_output():
    """Autocast is off inside: in bf16 the colour arithmetic (the mean luma's matmul) would change the values."""
    aug = BatchAugment(AugmentConfig(), 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug.train(_batch(4, 37), _generator(0))
    assert out.dtype == torch.float32
    assert torch.equal(out, aug.train(_batch(4, 37), _generator(0)))


def test_without_augmentation_train_is_a_plain_bilinear_resize():
    aug = BatchAugment(AugmentConfig(**NO_AUGMENT), 32)
    batch = _batch(4, 37)
    expected = F.interpolate(batch.permute(0, 3, 1, 2).float() / 255, size=(32, 32),
                             mode="bilinear", align_corners=False)
    torch.testing.assert_close(aug.train(batch, _generator(0)), _normalise(expected),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("compiling", [False, True])
@pytest.mark.parametrize("height, width", [(37, 37), (30, 45), (5, 90)])
def test_resampling_is_grid_sample_with_reflection_padding(height, width, compiling, monkeypatch):
    """Both paths resample as F.grid_sample does with F.affine_grid's grid, also where large
    rotations and small crops reach past the image and reflection padding takes over: eagerly
    grid_sample itself, compiled the gathers (run eagerly here)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    aug = BatchAugment(AugmentConfig(**{**NO_AUGMENT, "crop_scale_min": 0.05, "rotation_degrees": 180}), 24)
    batch = torch.randint(0, 256, (16, height, width, 3), dtype=torch.uint8, generator=_generator(10))
    params = aug.sample_params(16, _generator(11), "cpu")
    # Half the crops moved up to 2.5 image sides away: reflected several times over.
    far = torch.rand(8, 2, generator=_generator(12)) * 12 - 6
    params = dataclasses.replace(params, centre=torch.cat([params.centre[:8], far]))
    theta = crop_affine(params, height, width)
    grid = F.affine_grid(theta, [16, 3, 24, 24], align_corners=False)
    assert grid.min() < -3 and grid.max() > 3  # reflected twice over (the image is -1..1), both ways
    torch.testing.assert_close(affine_grid(theta, 24), grid, atol=1e-5, rtol=0)
    expected = F.grid_sample(batch.permute(0, 3, 1, 2).float(), grid, mode="bilinear",
                             padding_mode="reflection", align_corners=False)
    # 2e-4 after normalisation is a hundredth of a grey level: float32 rounding of equivalent
    # formulas, largest where the coordinates lie several image sides out.
    torch.testing.assert_close(aug.apply(batch, params), _normalise(expected / 255), atol=2e-4, rtol=0)


@pytest.mark.parametrize("settings", [{}, dict(crop_scale_min=0.05, color_jitter=0.8, rotation_degrees=45,
                                               random_erasing=0.5)])
def test_the_compiled_path_gives_the_eager_paths_output(settings, monkeypatch):
    """Resampling, colour (clipping included) and erasing agree between the two paths."""
    aug = BatchAugment(AugmentConfig(**settings), 32)
    batch = _batch(32, 37, seed=13)
    params = aug.sample_params(32, _generator(14), "cpu")
    eager = aug.apply(batch, params)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(aug.apply(batch, params), eager, atol=2e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_in_a_half_dtype_is_the_float32_output_rounded(dtype):
    batch = _batch(4, 37)
    full, half = BatchAugment(AugmentConfig(), 32), BatchAugment(AugmentConfig(), 32, dtype=dtype)
    for full_out, half_out in [(full.train(batch, _generator(0)), half.train(batch, _generator(0))),
                               (full.eval(batch), half.eval(batch))]:
        assert half_out.dtype == dtype and half_out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(half_out, full_out.to(dtype))


def test_flip_rate_matches_config():
    hflip, n = 0.3, 400
    aug = BatchAugment(AugmentConfig(**{**NO_AUGMENT, "hflip": hflip}), 16)
    image = _batch(1, 16)
    params = aug.sample_params(n, _generator(3), "cpu")
    # Same size in and out, no crop or rotation: the resampling is the identity.
    out = aug.apply(image.expand(n, -1, -1, -1), params)
    plain = _normalise(image.permute(0, 3, 1, 2).float() / 255)
    is_plain = (out - plain).abs().amax(dim=(1, 2, 3)) < 1e-4
    is_flipped = (out - plain.flip(3)).abs().amax(dim=(1, 2, 3)) < 1e-4
    assert torch.all(is_plain ^ is_flipped)  # every output is exactly one of the two
    assert torch.equal(is_flipped, params.flip)
    assert _binomial_ok(int(is_flipped.sum()), n, hflip)


def test_crop_scale_and_aspect_stay_in_range():
    crop_scale_min, n = 0.6, 20_000
    aug = BatchAugment(AugmentConfig(crop_scale_min=crop_scale_min, rotation_degrees=10), 32)
    params = aug.sample_params(n, _generator(4), "cpu")
    # The crop actually applied, from its affine on a square image: the columns' lengths are the
    # crop's half sides in grid units (a rotation keeps lengths), |det| its area fraction.
    theta = crop_affine(params, 37, 37)
    width, height = theta[:, :, 0].norm(dim=1), theta[:, :, 1].norm(dim=1)
    area = theta[:, :, :2].det().abs()
    assert area.min() >= crop_scale_min - 1e-5 and area.max() <= 1 + 1e-5
    torch.testing.assert_close(area, params.area, atol=1e-5, rtol=0)
    assert abs(area.mean().item() - (1 + crop_scale_min) / 2) < 0.01  # uniform in [min, 1]
    assert area.min() < crop_scale_min + 0.01 and area.max() > 0.99  # the whole range is used
    ratio = width / height
    assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
    assert ratio.min() < 0.76 and ratio.max() > 1.32  # the whole range where the crop fits...
    # ...and no more than fits: both sides within the image, so the range narrows as area nears 1.
    assert torch.all(ratio >= area - 1e-5) and torch.all(ratio <= 1 / area + 1e-5)
    # The crop rectangle (before rotation) lies inside the image.
    assert torch.all(theta[:, 0, 2].abs() + width <= 1 + 1e-5)
    assert torch.all(theta[:, 1, 2].abs() + height <= 1 + 1e-5)
    # The shift uses all the room the crop leaves, both ways on both axes (a halved range would not).
    for centre, side in ((theta[:, 0, 2], width), (theta[:, 1, 2], height)):
        room = 1 - side
        shift = centre[room > 0.1] / room[room > 0.1]
        assert shift.min() < -0.98 and shift.max() > 0.98
    assert params.angle.abs().max() <= math.radians(10) + 1e-6


def _with(aug: BatchAugment, n: int, **values) -> augment.AugmentParams:
    """Parameters of `n` samples, those named set to the given values (the others drawn)."""
    values = {name: torch.as_tensor(value, dtype=torch.bool if name == "flip" else torch.float32)
              for name, value in values.items()}
    return dataclasses.replace(aug.sample_params(n, _generator(30), "cpu"), **values)


@pytest.mark.parametrize("compiling", [False, True])
def test_crop_and_flip_are_torchvisions_resized_crop_and_hflip(compiling, monkeypatch):
    """The crop's position, size and aspect and the flip, against torchvision on a non-square input.
    Crops larger than the output: where torchvision upscales a crop it clamps at the crop's own
    edge, where this reads on into the image (one resampling of the whole image)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    height, width, size = 24, 36, 16
    boxes = [(2, 5, 20, 30), (0, 17, 18, 19), (6, 0, 18, 24), (0, 0, 24, 36)]  # top, left, height, width
    sides = torch.tensor([[w / width, h / height] for _, _, h, w in boxes])
    centre = torch.tensor([[(2 * left + w) / width - 1, (2 * top + h) / height - 1] for top, left, h, w in boxes])
    aug = BatchAugment(AugmentConfig(**NO_AUGMENT), size)
    batch = torch.randint(0, 256, (len(boxes), height, width, 3), dtype=torch.uint8, generator=_generator(31))
    flip = [False, True, False, True]
    params = _with(aug, len(boxes), area=sides.prod(dim=1), log_ratio=(sides[:, 0] / sides[:, 1]).log(),
                   centre=centre, flip=flip)
    out = aug.apply(batch, params)
    for i, (top, left, h, w) in enumerate(boxes):
        expected = TF.resized_crop(batch[i].permute(2, 0, 1).float() / 255, top, left, h, w, [size, size],
                                   antialias=False)
        expected = TF.horizontal_flip(expected) if flip[i] else expected
        torch.testing.assert_close(out[i], _normalise(expected), atol=1e-4, rtol=0)


@pytest.mark.parametrize("compiling", [False, True])
@pytest.mark.parametrize("height, width", [(20, 20), (20, 40), (40, 20)])
def test_rotation_is_torchvisions_rotate(height, width, compiling, monkeypatch):
    """Angle and direction (positive: counter-clockwise, as torchvision), also on a non-square input,
    where the rotation must be one in pixels, not in the image's -1..1 coordinates. The crop is the
    central 20 x 20 pixels, output at 20 px; compared inside the circle that stays in the image."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    size, angles = 20, [0.5, -0.9, 2.0]
    aug = BatchAugment(AugmentConfig(**NO_AUGMENT), size)
    batch = torch.randint(0, 256, (len(angles), height, width, 3), dtype=torch.uint8, generator=_generator(32))
    side_w, side_h = size / width, size / height
    params = _with(aug, len(angles), angle=angles, area=[side_w * side_h] * 3,
                   log_ratio=[math.log(side_w / side_h)] * 3, centre=torch.zeros(3, 2))
    out = aug.apply(batch, params)
    offsets = torch.arange(size) + 0.5 - size / 2
    inside = offsets[:, None] ** 2 + offsets[None, :] ** 2 < (size / 2 - 1.5) ** 2
    for i, angle in enumerate(angles):
        expected = TF.rotate(batch[i].permute(2, 0, 1).float() / 255, math.degrees(angle),
                             interpolation=TF.InterpolationMode.BILINEAR)
        expected = _normalise(TF.center_crop(expected, [size, size]))
        torch.testing.assert_close(out[i][:, inside], expected[:, inside], atol=1e-4, rtol=0)


def test_colour_jitter_matches_torchvision_brightness_contrast_saturation():
    jitter = 0.2
    aug = BatchAugment(AugmentConfig(**{**NO_AUGMENT, "color_jitter": jitter}), 16)
    # Mid-range pixels: no factor in [0.8, 1.2] pushes them out of [0, 1], where torchvision
    # clips after every step and this clips once at the end. Blocks of 4 x 4 equal pixels: the
    # mean luma contrast blends towards is estimated from every 4th row and column, exact here.
    blocks = (torch.rand(32, 4, 4, 3, generator=_generator(5)) * 100 + 80).to(torch.uint8)
    batch = blocks.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    params = aug.sample_params(32, _generator(6), "cpu")
    out = aug.apply(batch, params)
    for i in range(32):
        image = batch[i].permute(2, 0, 1).float() / 255
        image = TF.adjust_brightness(image, params.brightness[i].item())
        image = TF.adjust_contrast(image, params.contrast[i].item())
        image = TF.adjust_saturation(image, params.saturation[i].item())
        torch.testing.assert_close(out[i], _normalise(image), atol=1e-4, rtol=0)
    factors = torch.stack([params.brightness, params.contrast, params.saturation])
    assert factors.min() >= 1 - jitter and factors.max() <= 1 + jitter


def test_contrast_blends_towards_the_whole_images_mean_luma_not_the_crops():
    """Documented difference from torchvision (which takes the crop's mean): contrast 0 turns a
    crop of the dark half of a half-dark, half-bright image into the whole image's mean grey."""
    aug = BatchAugment(AugmentConfig(**{**NO_AUGMENT, "color_jitter": 0.5}), 16)
    batch = torch.full((1, 32, 32, 3), 40, dtype=torch.uint8)
    batch[:, :, 16:] = 200
    params = dataclasses.replace(aug.sample_params(1, _generator(8), "cpu"), area=torch.tensor([0.25]),
                                 log_ratio=torch.zeros(1), centre=torch.tensor([[-0.5, 0.0]]),
                                 brightness=torch.ones(1), contrast=torch.zeros(1), saturation=torch.ones(1))
    out = aug.apply(batch, params)[0]
    whole_mean = torch.full((3, 16, 16), (40 + 200) / 2 / 255)
    torch.testing.assert_close(out, _normalise(whole_mean), atol=1e-5, rtol=0)


def test_erasing_rate_and_rectangle_area_match_config():
    p, n, size = 0.4, 300, 48
    aug = BatchAugment(AugmentConfig(**{**NO_AUGMENT, "random_erasing": p}), size)
    batch = torch.full((n, size, size, 3), 200, dtype=torch.uint8)  # never 0 once normalised
    params = aug.sample_params(n, _generator(7), "cpu")
    erased = (aug.apply(batch, params) == 0).all(dim=1)  # N x size x size
    assert torch.equal(erased.any(dim=(1, 2)), params.erase)
    assert _binomial_ok(int(params.erase.sum()), n, p)
    # The sampled rectangles cover 2-20% of the image...
    top, left, height, width = params.erase_box.unbind(1)
    area = height * width
    assert area.min() >= 0.02 - 1e-6 and area.max() <= 0.2 + 1e-6
    assert top.min() >= 0 and (top + height).max() <= 1 + 1e-6
    assert left.min() >= 0 and (left + width).max() <= 1 + 1e-6
    # The whole 2-20% range is drawn, and the rectangle may lie anywhere in the image.
    assert area.min() < 0.03 and area.max() > 0.18
    for offset, room in ((top, 1 - height), (left, 1 - width)):
        assert (offset / room).min() < 0.05 and (offset / room).max() > 0.95
    # ...and each erased region is that rectangle, up to one pixel of rounding per side.
    for i in torch.nonzero(params.erase).flatten().tolist():
        rows, cols = erased[i].any(dim=1), erased[i].any(dim=0)
        assert torch.equal(erased[i], rows[:, None] & cols[None, :])
        assert abs(rows.sum().item() - height[i].item() * size) < 1
        assert abs(cols.sum().item() - width[i].item() * size) < 1


@pytest.mark.parametrize("input_size", [37, 50])
def test_eval_is_the_torchvision_centre_crop_and_resize(input_size):
    image_size = 32
    aug = BatchAugment(AugmentConfig(), image_size)
    batch = _batch(3, input_size, seed=8)
    out = aug.eval(batch)
    assert torch.equal(out, aug.eval(batch))
    side = round(input_size * image_size / cache_size_for(image_size))  # 32 of 37, 43 of 50
    reference = TF.center_crop(batch.permute(0, 3, 1, 2).float(), [side, side])
    reference = TF.resize(reference, [image_size, image_size], antialias=True)
    # Same interpolation kernel (identity when side == image_size), so only float32 rounding
    # differs: 1e-4 after normalisation is 0.006 grey levels, far below one level (0.017).
    torch.testing.assert_close(out, _normalise(reference / 255), atol=1e-4, rtol=0)


def test_normalisation_is_imagenets_rgb_mean_and_std():
    """What the pretrained backbones were trained on, written out rather than imported from the module:
    a changed or reordered constant changes every input the model sees."""
    aug = BatchAugment(AugmentConfig(**NO_AUGMENT), 16)
    batch = torch.tensor([0, 128, 255], dtype=torch.uint8).expand(1, 18, 18, 3)
    expected = torch.tensor([(0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    for out in (aug.eval(batch), aug.train(batch, _generator(0))):
        torch.testing.assert_close(out[0], expected[:, None, None].expand(3, 16, 16), atol=1e-5, rtol=0)


def test_rejects_batches_that_are_not_uint8_nhwc():
    aug = BatchAugment(AugmentConfig(), 32)
    with pytest.raises(ValueError, match="uint8"):
        aug.eval(torch.zeros(2, 3, 37, 37))


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("settings", [
    dict(crop_scale_min=1.0, hflip=1.0, color_jitter=0.0, rotation_degrees=0.0, random_erasing=1.0),
    dict(crop_scale_min=0.01, hflip=0.0, color_jitter=1.0, rotation_degrees=180.0, random_erasing=0.0)])
def test_config_extremes_and_tiny_batches_give_finite_outputs(n, settings):
    aug = BatchAugment(AugmentConfig(**settings), 32)
    for height, width in [(37, 37), (5, 90)]:  # also a tiny, very non-square input
        batch = torch.randint(0, 256, (n, height, width, 3), dtype=torch.uint8, generator=_generator(8))
        params = aug.sample_params(n, _generator(9), "cpu")
        out = aug.apply(batch, params)
        assert out.shape == (n, 3, 32, 32) and torch.isfinite(out).all()
        assert torch.isfinite(aug.eval(batch)).all()
        assert params.flip.tolist() == [settings["hflip"] == 1.0] * n
        assert params.erase.tolist() == [settings["random_erasing"] == 1.0] * n
        if settings["crop_scale_min"] == 1.0:
            assert torch.all(params.area == 1) and torch.all(params.log_ratio == 0)


def test_compiled_augmentation_traces_whole_and_matches_eager():
    """What the GPU runs, compiled here on the CPU: one graph (no break), the eager path's output
    to within bf16 rounding, and the training and eval paths both."""
    aug = BatchAugment(AugmentConfig(), 32, dtype=torch.bfloat16)
    batch = _batch(8, 37, seed=15)
    uniform = aug.draw(8, _generator(16), "cpu")
    train = torch.compile(aug.apply_uniform, dynamic=False, fullgraph=True)(batch, uniform)
    assert train.dtype == torch.bfloat16 and train.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(train.float(), aug.apply_uniform(batch, uniform).float(), atol=1e-2, rtol=1e-2)
    evaluated = torch.compile(aug.eval, dynamic=False, fullgraph=True)(batch)
    torch.testing.assert_close(evaluated.float(), aug.eval(batch).float(), atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_augmentation_on_cuda_matches_eager():
    """The Triton-compiled path (the one training runs on a GPU) against the eager one, on the GPU."""
    aug = BatchAugment(AugmentConfig(), 224, dtype=torch.bfloat16)
    batch = _batch(64, cache_size_for(224), seed=17).cuda()
    uniform = aug.draw(64, torch.Generator("cuda").manual_seed(18), "cuda")
    compiled = torch.compile(aug.apply_uniform, dynamic=False, fullgraph=True)(batch, uniform)
    assert compiled.dtype == torch.bfloat16 and compiled.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(compiled.float(), aug.apply_uniform(batch, uniform).float(), atol=2e-2, rtol=1e-2)


def _params(n=20_000, **settings):
    aug = BatchAugment(AugmentConfig(**{"crop_scale_min": 0.5, "hflip": 0.5, "color_jitter": 0.4,
                                        "rotation_degrees": 30, "random_erasing": 0.5, **settings}), 32)
    return aug.sample_params(n, torch.Generator().manual_seed(21), "cpu")


def test_random_parameters_are_drawn_independently():
    """Every pair of per-sample parameters is uncorrelated (|r| < 0.05 at n = 20,000 is ~7 standard
    errors): e.g. a flip drawn from the rotation's uniform would flip exactly the left-turned faces."""
    p = _params()
    columns = {"area": p.area, "log_ratio": p.log_ratio, "centre_x": p.centre[:, 0], "centre_y": p.centre[:, 1],
               "angle": p.angle, "flip": p.flip.double(), "brightness": p.brightness, "contrast": p.contrast,
               "saturation": p.saturation, "erase": p.erase.double(), "erase_top": p.erase_box[:, 0],
               "erase_left": p.erase_box[:, 1]}
    names = list(columns)
    matrix = np.corrcoef(np.stack([columns[k].double().numpy() for k in names]))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert abs(matrix[i, j]) < 0.05, (names[i], names[j], matrix[i, j])


def test_flip_and_erasing_rates_and_erasing_aspect_match_config():
    """At n = 20,000 a rate off by 5% of its value is over 4.5 standard deviations out: the small
    batches that check the pixels above could not tell."""
    n, hflip, erasing = 20_000, 0.3, 0.4
    p = _params(n, hflip=hflip, random_erasing=erasing)
    assert _binomial_ok(int(p.flip.sum()), n, hflip) and _binomial_ok(int(p.erase.sum()), n, erasing)
    # Erased rectangles: aspect (width / height) log-uniform over torchvision's 0.3..3.3.
    log_aspect = (p.erase_box[:, 3] / p.erase_box[:, 2]).log()
    assert log_aspect.min() >= math.log(0.3) - 1e-5 and log_aspect.max() <= math.log(3.3) + 1e-5
    assert log_aspect.min() < math.log(0.31) and log_aspect.max() > math.log(3.2)
    assert abs(log_aspect.mean().item() - math.log(0.3 * 3.3) / 2) < 0.02


def test_rotation_shift_and_jitter_are_symmetric_around_no_change():
    """Angles in [-r, r], crop centres on both sides, jitter factors around 1: means near the middle."""
    p = _params()
    assert abs(p.angle.mean().item()) < math.radians(30) * 0.03
    assert p.angle.min() < -math.radians(29) and p.angle.max() > math.radians(29)
    assert p.centre.mean(dim=0).abs().max().item() < 0.01
    assert (p.centre < 0).any(dim=0).all() and (p.centre > 0).any(dim=0).all()
    for factor in (p.brightness, p.contrast, p.saturation):
        assert abs(factor.mean().item() - 1) < 0.01
        assert factor.min() < 0.61 and factor.max() > 1.39


@pytest.mark.parametrize("slice_bytes", [1, 3 * 37 * 37 * 4 * 3])  # one image per slice; three (the last short)
def test_the_cpus_slice_by_slice_path_gives_the_whole_batch_result(monkeypatch, slice_bytes):
    aug = BatchAugment(AugmentConfig(), 32)
    batch = torch.randint(0, 256, (8, 37, 37, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    params = aug.sample_params(8, torch.Generator().manual_seed(4), "cpu")
    whole_train, whole_eval = aug.apply(batch, params), aug.eval(batch)
    monkeypatch.setattr(augment, "CPU_SLICE_BYTES", slice_bytes)
    torch.testing.assert_close(aug.apply(batch, params), whole_train, atol=0, rtol=0)
    torch.testing.assert_close(aug.eval(batch), whole_eval, atol=0, rtol=0)


def test_the_output_memory_format_is_the_one_asked_for():
    """`trainer.channels_last: false` left the batches channels_last, so the convolutions still ran
    NHWC: only the weights' order changed. Both orders hold the same values."""
    batch = _batch(8, 37)
    nhwc, nchw = (BatchAugment(AugmentConfig(), 32, memory_format=f) for f in (torch.channels_last,
                                                                                torch.contiguous_format))
    for fast, plain in [(nhwc.train(batch, _generator(0)), nchw.train(batch, _generator(0))),
                        (nhwc.eval(batch), nchw.eval(batch))]:
        assert plain.is_contiguous() and not plain.is_contiguous(memory_format=torch.channels_last)
        assert fast.is_contiguous(memory_format=torch.channels_last) and torch.equal(fast, plain)


def test_compiled_augmentation_compiles_once_per_shape():
    """The colour constants were cached on the instance at the first call, inside the compiled function:
    Dynamo guarded on the empty cache, so the second call of the same shape compiled everything again
    (on a GPU, a second compilation of the training augmentation and of validation's)."""
    torch._dynamo.reset()
    counter = CompileCounter()
    aug = BatchAugment(AugmentConfig(), 32)
    train = torch.compile(aug.apply_uniform, dynamic=False, backend=counter)
    evaluate = torch.compile(aug.eval, dynamic=False, backend=counter)
    batch = _batch(4, 37)
    for step in range(3):
        train(batch, aug.draw(4, _generator(step), "cpu"))
        evaluate(batch)
    assert counter.frame_count == 2
