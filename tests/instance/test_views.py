"""Unlabeled views: exact geometry round trips, flip-back of padded feature maps, photometric noise."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmt_psm.instance.augment import color_jitter, random_erase, sample_erase_boxes
from mmt_psm.instance.views import ViewTransform, flip_feature_map, level_width, make_unlabeled_views

STRIDES = (4, 8, 16, 32, 64)


# ---------------------------------------------------------------------- geometry
def test_boxes_round_trip_and_values():
    t = ViewTransform(source=(100, 150), resized=(200, 300), hflip=True)
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 150.0, 100.0]])
    out = t.apply_boxes(boxes)
    torch.testing.assert_close(out[0], torch.tensor([240.0, 40.0, 280.0, 80.0]))
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.0, 300.0, 200.0]))
    torch.testing.assert_close(t.inverse_boxes(out), boxes)
    flip_only = ViewTransform((100, 150), (100, 150), True)
    assert torch.equal(flip_only.inverse_boxes(flip_only.apply_boxes(boxes)), boxes)


def test_boxes_keep_detectron2_type():
    structures = pytest.importorskip("detectron2.structures")
    t = ViewTransform((10, 20), (10, 20), True)
    b = structures.Boxes(torch.tensor([[1.0, 2.0, 5.0, 6.0]]))
    out = t.apply_boxes(b)
    assert isinstance(out, structures.Boxes)
    torch.testing.assert_close(out.tensor, torch.tensor([[15.0, 2.0, 19.0, 6.0]]))
    m = structures.BitMasks(torch.rand(2, 10, 20) > 0.5)
    back = t.inverse_masks(t.apply_masks(m))
    assert isinstance(back, structures.BitMasks) and torch.equal(back.tensor, m.tensor)


def test_masks_round_trip_exact():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 12, 20, generator=g) > 0.5
    flip = ViewTransform((12, 20), (12, 20), True)
    assert torch.equal(flip.apply_masks(masks), masks.flip(-1))
    assert torch.equal(flip.inverse_masks(flip.apply_masks(masks)), masks)
    up = ViewTransform((12, 20), (24, 40), True)  # integer factor: nearest resize is exactly invertible
    view = up.apply_masks(masks)
    assert view.shape == (3, 24, 40) and view.dtype == torch.bool
    assert torch.equal(view.flip(-1)[:, ::2, ::2], masks)  # nearest 2x upsampling, then flipped
    assert torch.equal(up.inverse_masks(view), masks)
    assert up.apply_masks(torch.zeros(0, 12, 20, dtype=torch.bool)).shape == (0, 24, 40)


def _pad_batch(images, divisibility=32):
    """Detectron2 ImageList.from_tensors: pad at bottom/right to a multiple of ``divisibility``."""
    h = max(i.shape[-2] for i in images)
    w = max(i.shape[-1] for i in images)
    h, w = -(-h // divisibility) * divisibility, -(-w // divisibility) * divisibility
    return torch.stack([F.pad(i, (0, w - i.shape[-1], 0, h - i.shape[-2])) for i in images])


def _pyramid(x):
    """A conv-free 'backbone': average pooling at strides 4..64 (ceil mode covers the padded border)."""
    return {s: F.avg_pool2d(x, s, s, ceil_mode=True) for s in STRIDES}


def test_flip_back_feature_maps_with_padding():
    g = torch.Generator().manual_seed(0)
    # Widths are multiples of 64 but not of each other; the batch pads the first image on the right.
    # Integer pixel values: block sums are exact in float32, so equality is bitwise, not up to rounding.
    images = [torch.randint(0, 256, (3, 96, 128), generator=g).float(),
              torch.randint(0, 256, (3, 80, 192), generator=g).float()]
    feats = _pyramid(_pad_batch(images))
    feats_flipped = _pyramid(_pad_batch([i.flip(-1) for i in images]))
    widths = [i.shape[-1] for i in images]
    for s in STRIDES:
        back = flip_feature_map(feats_flipped[s], [level_width(w, s) for w in widths])
        assert torch.equal(back, feats[s]), s
        # Flipping the padded tensor instead is wrong wherever there is padding.
        assert not torch.equal(feats_flipped[s].flip(-1), feats[s])
        # Single image: a plain int width and the ViewTransform API give the same result.
        one = feats_flipped[s][:1]
        t = ViewTransform((96, 128), (96, 128), True)
        assert torch.equal(flip_feature_map(one, level_width(128, s)), feats[s][:1])
        assert torch.equal(t.inverse_feature_map(one, s), feats[s][:1])


def test_flip_feature_map_involution_and_grad():
    x = torch.randn(2, 3, 4, 10, requires_grad=True)
    y = flip_feature_map(flip_feature_map(x, [7, 10]), [7, 10])
    assert torch.equal(y, x)
    flip_feature_map(x, 6).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError):
        flip_feature_map(x, 11)
    with pytest.raises(ValueError):
        ViewTransform((4, 4), (8, 8), True).apply_feature_map(x, 4)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_flip_feature_map_width_zero_keeps_an_image_and_bad_widths_raise(as_tensor):
    # the batched teacher flips back only its flipped views: valid width 0 for the others (host ints: no sync)
    x = torch.randn(2, 3, 4, 10)
    widths = lambda w: torch.tensor(w) if as_tensor else w  # noqa: E731
    y = flip_feature_map(x, widths([0, 7]))
    assert torch.equal(y[0], x[0]) and torch.equal(y[1], flip_feature_map(x[1:], 7)[0])
    for bad in ([11, 0], [-1, 3]):
        with pytest.raises(ValueError, match="outside"):
            flip_feature_map(x, widths(bad))
    with pytest.raises(ValueError, match="3 valid widths for a batch of 2"):
        flip_feature_map(x, widths([1, 2, 3]))


# ---------------------------------------------------------------------- photometric
def _image(seed=0, h=128, w=160, gray=False):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    if gray:
        img[..., 1] = img[..., 0]
        img[..., 2] = img[..., 0]
    return img


def test_color_jitter_shape_dtype_determinism():
    img = _image()
    a = color_jitter(img, np.random.default_rng(1))
    b = color_jitter(img, np.random.default_rng(1))
    c = color_jitter(img, np.random.default_rng(2))
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.shares_memory(a, img)
    assert np.array_equal(color_jitter(img, np.random.default_rng(1), 0.0, 0.0, 0.0), img)


def test_color_jitter_grayscale_stays_grayscale():
    img = _image(gray=True)
    out = color_jitter(img, np.random.default_rng(3), hue=0.5)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    out2d = color_jitter(img[..., 0], np.random.default_rng(3))
    assert out2d.shape == img.shape[:2]


def test_color_jitter_hue_changes_colour_only_by_hue():
    img = _image()
    out = color_jitter(img, np.random.default_rng(0), brightness=0.0, contrast=0.0, hue=0.05)
    assert not np.array_equal(out, img)
    hsv_in = cv2.cvtColor(img, cv2.COLOR_BGR2HSV_FULL).astype(int)
    hsv_out = cv2.cvtColor(out, cv2.COLOR_BGR2HSV_FULL).astype(int)
    assert np.abs(hsv_out[..., 2] - hsv_in[..., 2]).max() <= 2  # value (max channel) ~kept


def test_random_erase_bounds_and_determinism():
    h, w = 512, 512
    area = (0.001, 0.004)
    n_boxes = 0
    for seed in range(50):
        boxes = sample_erase_boxes(h, w, np.random.default_rng(seed), 0.9, 10, area, (0.2, 5.0))
        assert boxes.shape[1] == 4 and len(boxes) <= 10
        top, left, ph, pw = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + ph <= h).all() and (left + pw <= w).all()
        assert (ph * pw <= area[1] * h * w).all() and (ph * pw >= 0.5 * area[0] * h * w).all()
        assert ((ph / pw >= 0.2 * 0.8) & (ph / pw <= 5.0 / 0.8)).all()
        n_boxes += len(boxes)
    assert 100 < n_boxes < 350  # about 50 * 5 * 0.9
    img = _image(h=h, w=w)
    a = random_erase(img, np.random.default_rng(7))
    b = random_erase(img, np.random.default_rng(7))
    assert a.shape == img.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    changed = (a != img).any(-1)
    boxes = sample_erase_boxes(h, w, np.random.default_rng(7))
    covered = np.zeros((h, w), bool)
    for top, left, ph, pw in boxes:
        covered[top : top + ph, left : left + pw] = True
    assert not changed[~covered].any() and changed.sum() > 0.9 * covered.sum()
    assert np.array_equal(random_erase(img, np.random.default_rng(7), prob=0.0), img)
    assert np.array_equal(random_erase(img, np.random.default_rng(7), max_patches=0), img)


# ---------------------------------------------------------------------- views
def test_make_unlabeled_views_layout():
    img = _image(h=100, w=150)
    views = make_unlabeled_views(img, np.random.default_rng(0), resize_to=(64, 96))
    assert len(views["teacher_views"]) == 4 and len(views["teacher_transforms"]) == 4
    for v in views["teacher_views"] + [views["student_view"], views["base_image"]]:
        assert v.shape == (3, 64, 96) and v.dtype == torch.uint8
    tv, tt = views["teacher_views"], views["teacher_transforms"]
    assert [t.hflip for t in tt] == [False, True, False, True]
    assert all(t.source == (64, 96) and t.resized == (64, 96) for t in tt)
    assert torch.equal(tv[1], tv[0].flip(-1)) and torch.equal(tv[3], tv[2].flip(-1))
    assert not torch.equal(tv[0], tv[2])  # independent perturbations
    assert views["student_transform"].hflip is False
    bt = views["base_transform"]
    assert bt.source == (100, 150) and bt.resized == (64, 96)
    base = cv2.resize(img, (96, 64), interpolation=cv2.INTER_LINEAR)
    if bt.hflip:
        base = base[:, ::-1]
    assert np.array_equal(views["base_image"].permute(1, 2, 0).numpy(), base)
    # Seeded determinism.
    again = make_unlabeled_views(img, np.random.default_rng(0), resize_to=(64, 96))
    assert all(torch.equal(a, b) for a, b in zip(again["teacher_views"], tv))
    assert torch.equal(again["student_view"], views["student_view"])


def test_make_unlabeled_views_options():
    img = _image(h=64, w=64)
    v = make_unlabeled_views(img, np.random.default_rng(1), num_teacher_copies=1, teacher_flip=False,
                             student_flip=True, base_flip_prob=0.0)
    assert len(v["teacher_views"]) == 1 and v["student_transform"].hflip
    assert v["base_transform"] == ViewTransform((64, 64), (64, 64), False)
    flips = {make_unlabeled_views(img, np.random.default_rng(s))["base_transform"].hflip for s in range(20)}
    assert flips == {True, False}
