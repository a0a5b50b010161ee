"""Augmentation: waveform (noise, speed, shift), feature (SpecAugment, mixup) and TTA."""

from __future__ import annotations

import math

import pytest
import torch

from ser_pipeline.augment import (
    SpecAugment,
    WaveAugment,
    add_noise,
    average_predictions,
    mixup,
    speed_perturb,
    time_shift,
    tta_views,
)

SAMPLE_RATE = 16000


def sine(freq: float, seconds: float = 0.5, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * SAMPLE_RATE), dtype=torch.float64) / SAMPLE_RATE
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


def noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(clean.pow(2).mean(-1) / (noisy - clean).pow(2).mean(-1))


def dominant_frequency(wave: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(wave * torch.hann_window(wave.shape[-1]))
    return float(spectrum.abs().argmax()) * SAMPLE_RATE / wave.shape[-1]


def spec_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Positive features ``(3, 2, 16, 50)`` (so a 0-filled cell is recognisable) and lengths."""
    features = noise(3, 2, 16, 50).abs() + 1.0
    return features, torch.tensor([50, 30, 10])


# --------------------------------------------------------------------------- add_noise


@pytest.mark.parametrize("shape", [(8000,), (3, 8000)])
def test_add_noise_keeps_shape_and_dtype_and_changes_signal(shape: tuple[int, ...]) -> None:
    wave = noise(*shape)
    noisy = add_noise(wave, 10.0, generator=1)
    assert noisy.shape == wave.shape and noisy.dtype == wave.dtype
    assert not torch.equal(noisy, wave)


def test_add_noise_reaches_the_requested_snr_per_row() -> None:
    wave = torch.stack([sine(440.0), sine(1000.0, amplitude=0.01), noise(8000)])
    requested = torch.tensor([0.0, 10.0, 25.0])
    measured = snr_db(wave, add_noise(wave, requested, generator=0))
    torch.testing.assert_close(measured, requested, atol=1e-3, rtol=0)


def test_add_noise_tiles_supplied_noise_to_the_signal_length() -> None:
    wave = sine(440.0)
    babble = noise(3000)
    noisy = add_noise(wave, 5.0, noise=babble)
    assert snr_db(wave, noisy) == pytest.approx(5.0, abs=1e-3)
    added = noisy - wave
    torch.testing.assert_close(added[3000:6000], added[:3000])


def test_add_noise_leaves_silence_silent() -> None:
    silence = torch.zeros(4000)
    assert torch.equal(add_noise(silence, 10.0, generator=0), silence)


# --------------------------------------------------------------------------- speed_perturb


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturb_keeps_shape_and_dtype(factor: float) -> None:
    wave = noise(2, 8000)
    perturbed = speed_perturb(wave, factor, SAMPLE_RATE)
    assert perturbed.shape == wave.shape and perturbed.dtype == wave.dtype
    assert not torch.equal(perturbed, wave)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturb_scales_a_sines_frequency_by_the_factor(factor: float) -> None:
    perturbed = speed_perturb(sine(500.0, seconds=1.0), factor, SAMPLE_RATE)
    content = perturbed[: int(SAMPLE_RATE / max(factor, 1.0))]  # skip the zero padding
    assert dominant_frequency(content) == pytest.approx(500.0 * factor, abs=2.0)


def test_speed_perturb_faster_shortens_content_and_zero_pads() -> None:
    perturbed = speed_perturb(sine(500.0), 1.25, SAMPLE_RATE)
    content_samples = int(8000 / 1.25)
    assert (perturbed[content_samples + 10 :] == 0).all()
    assert perturbed[content_samples - 100 : content_samples - 10].abs().max() > 0.1


def test_speed_perturb_by_one_is_the_identity() -> None:
    wave = noise(4000)
    assert torch.equal(speed_perturb(wave, 1.0, SAMPLE_RATE), wave)


# --------------------------------------------------------------------------- time_shift


def test_time_shift_rolls_each_row_by_at_most_max_shift() -> None:
    wave = noise(4, 1000)
    shifted = time_shift(wave, max_shift=50, generator=3)
    assert shifted.shape == wave.shape and shifted.dtype == wave.dtype
    for row, shifted_row in zip(wave, shifted, strict=True):
        matches = [k for k in range(-50, 51) if torch.equal(torch.roll(row, k), shifted_row)]
        assert len(matches) == 1
    assert not torch.equal(shifted, wave)


def test_time_shift_without_roll_fills_the_gap_with_zeros() -> None:
    wave = noise(1000) + 10.0  # no zero samples of its own
    shifted = time_shift(wave, max_shift=50, generator=4, roll=False)
    zeros = int((shifted == 0).sum())
    assert 0 < zeros <= 50
    kept = shifted[shifted != 0]
    assert any(torch.equal(kept, wave[k : k + kept.numel()]) for k in range(zeros + 1))


# --------------------------------------------------------------------------- WaveAugment


def test_wave_augment_keeps_shape_and_dtype_and_changes_signal() -> None:
    augment = WaveAugment(noise_prob=1.0, speed_prob=1.0, shift_prob=1.0)
    wave = noise(2, 8000)
    augmented = augment(wave, generator=0)
    assert augmented.shape == wave.shape and augmented.dtype == wave.dtype
    assert not torch.equal(augmented, wave)


def test_wave_augment_is_the_identity_in_eval_mode() -> None:
    augment = WaveAugment(noise_prob=1.0, speed_prob=1.0, shift_prob=1.0).eval()
    wave = noise(8000)
    assert torch.equal(augment(wave, generator=0), wave)


def test_wave_augment_with_zero_probabilities_changes_nothing() -> None:
    wave = noise(8000)
    assert torch.equal(WaveAugment()(wave, generator=0), wave)


# --------------------------------------------------------------------------- SpecAugment


def test_spec_augment_time_masks_stay_within_each_items_length() -> None:
    features, lengths = spec_batch()
    augment = SpecAugment(freq_masks=0, time_masks=3, time_width=8, mask_value=0.0)
    masked = augment(features, lengths, generator=0)
    assert masked.shape == features.shape and masked.dtype == features.dtype
    for item, length in enumerate(lengths.tolist()):
        assert torch.equal(masked[item, ..., length:], features[item, ..., length:])
        masked_frames = (masked[item] == 0).all(dim=(0, 1))
        assert masked_frames[:length].any()
        assert not (masked[item] == 0)[..., ~masked_frames].any()  # whole frames, all channels


def test_spec_augment_freq_masks_cover_whole_feature_rows() -> None:
    features, lengths = spec_batch()
    augment = SpecAugment(freq_masks=2, freq_width=4, time_masks=0, mask_value=0.0)
    masked = augment(features, lengths, generator=0)
    masked_rows = (masked == 0).all(dim=-1)  # (batch, channels, n_features)
    assert masked_rows.any()
    assert torch.equal((masked == 0).any(dim=-1), masked_rows)
    assert masked_rows.sum(dim=-1).max() <= 2 * 4


def test_spec_augment_fills_with_each_items_valid_mean_by_default() -> None:
    features, lengths = spec_batch()
    masked = SpecAugment(freq_masks=0, time_masks=1, time_width=5)(features, lengths, generator=2)
    changed = masked != features
    for item, length in enumerate(lengths.tolist()):
        for channel in range(features.shape[1]):
            fill = masked[item, channel][changed[item, channel]]
            expected = features[item, channel, :, :length].mean()
            torch.testing.assert_close(fill, torch.full_like(fill, float(expected)))


def test_spec_augment_is_the_identity_in_eval_mode() -> None:
    features, lengths = spec_batch()
    assert torch.equal(SpecAugment().eval()(features, lengths, generator=0), features)


# --------------------------------------------------------------------------- mixup


def test_mixup_gives_soft_targets_that_sum_to_one() -> None:
    features, lengths = spec_batch()
    targets = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), 4).float()
    mixed = mixup(features, targets, alpha=0.4, generator=0, lengths=lengths)
    assert mixed.features.shape == features.shape and mixed.targets.shape == targets.shape
    torch.testing.assert_close(mixed.targets.sum(-1), torch.ones(3))


def test_mixup_blends_each_item_with_its_partner_by_lambda() -> None:
    features, lengths = spec_batch()
    targets = torch.eye(3)
    mixed = mixup(features, targets, alpha=1.0, generator=5, lengths=lengths)
    lam, partner = mixed.lam, mixed.permutation
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(mixed.features, lam * features + (1 - lam) * features[partner])
    torch.testing.assert_close(mixed.targets, lam * targets + (1 - lam) * targets[partner])


def test_mixup_length_is_the_longer_of_the_pair() -> None:
    features, lengths = spec_batch()
    mixed = mixup(features, torch.eye(3), alpha=1.0, generator=1, lengths=lengths)
    assert torch.equal(mixed.lengths, torch.maximum(lengths, lengths[mixed.permutation]))


def test_mixup_mixes_every_head_in_a_target_dict_alike() -> None:
    features, _ = spec_batch()
    targets = {"emotion": torch.eye(3), "vad": torch.rand(3, 3)}
    mixed = mixup(features, targets, alpha=1.0, generator=2)
    lam, partner = mixed.lam, mixed.permutation
    for name, value in targets.items():
        torch.testing.assert_close(mixed.targets[name], lam * value + (1 - lam) * value[partner])


def test_mixup_rejects_class_indices() -> None:
    features, _ = spec_batch()
    with pytest.raises(TypeError):
        mixup(features, torch.tensor([0, 1, 2]), alpha=0.4, generator=0)


# --------------------------------------------------------------------------- reproducibility


RANDOM_AUGMENTATIONS = {
    "add_noise": lambda seed: add_noise(noise(2, 4000), 10.0, generator=seed),
    "time_shift": lambda seed: time_shift(noise(2, 4000), 100, generator=seed),
    "wave_augment": lambda seed: WaveAugment(1.0, speed_prob=1.0, shift_prob=1.0)(
        noise(2, 4000), generator=seed
    ),
    "spec_augment": lambda seed: SpecAugment()(*spec_batch(), generator=seed),
    "mixup": lambda seed: mixup(spec_batch()[0], torch.eye(3), 0.4, generator=seed).features,
    "tta_views": lambda seed: torch.stack(tta_views(noise(4000), 3, generator=seed)),
}


@pytest.mark.parametrize("name", sorted(RANDOM_AUGMENTATIONS))
def test_same_seed_gives_same_output_and_another_seed_differs(name: str) -> None:
    augmentation = RANDOM_AUGMENTATIONS[name]
    assert torch.equal(augmentation(7), augmentation(7))
    assert torch.equal(
        augmentation(torch.Generator().manual_seed(7)),
        augmentation(torch.Generator().manual_seed(7)),
    )
    assert not torch.equal(augmentation(7), augmentation(8))


# --------------------------------------------------------------------------- TTA


def test_tta_views_first_view_is_the_original_and_the_others_differ() -> None:
    wave = noise(4000)
    views = tta_views(wave, n_views=4, generator=0)
    assert len(views) == 4
    assert views[0] is wave
    for view in views[1:]:
        assert view.shape == wave.shape and view.dtype == wave.dtype
        assert not torch.equal(view, wave)


def test_average_predictions_averages_probabilities_and_vad_values() -> None:
    first = {"emotion": torch.tensor([[10.0, 0.0]]), "vad": torch.tensor([[0.2, 0.4, 0.6]])}
    second = {"emotion": torch.tensor([[0.0, 0.0]]), "vad": torch.tensor([[0.4, 0.6, 0.8]])}
    merged = average_predictions([first, second])
    expected_probs = (first["emotion"].softmax(-1) + torch.tensor([[0.5, 0.5]])) / 2
    torch.testing.assert_close(merged["emotion"], expected_probs)
    torch.testing.assert_close(merged["emotion"].sum(-1), torch.ones(1))
    torch.testing.assert_close(merged["vad"], torch.tensor([[0.3, 0.5, 0.7]]))


def test_average_predictions_rejects_views_with_different_heads() -> None:
    with pytest.raises(ValueError):
        average_predictions([{"emotion": torch.zeros(1, 2)}, {"gender": torch.zeros(1, 2)}])


def test_training_segments_are_random_crops_drawn_anew_and_val_test_stay_whole(tmp_path) -> None:
    from ser_pipeline.corpora import read_synthetic
    from ser_pipeline.data import SERDataModule
    from ser_pipeline.features import LogMelFeatures

    features = LogMelFeatures(n_mels=16)
    data = SERDataModule(
        "synthetic", lambda r: read_synthetic(r, n_speakers=4, utterances_per_class=2),
        str(tmp_path / "corpus"), features, ["anger", "happiness", "neutral", "sadness"],
        split="loso", fold=0, progress=False, train_crop_seconds=0.25)
    data.setup()
    segment = int(0.25 * features.sample_rate / features.hop_length) + 1
    train = data.datasets["train"]
    torch.manual_seed(0)
    whole = train.features[0]
    draws = [train[0]["features"] for _ in range(8)]
    assert all(d.shape[-1] == segment for d in draws)
    # each draw is a window of the whole utterance, and the windows differ between draws
    starts = {next(s for s in range(whole.shape[-1] - segment + 1)
                   if torch.equal(whole[..., s:s + segment], d)) for d in draws}
    assert len(starts) > 1
    for part in ("val", "test"):
        dataset = data.datasets[part]
        assert all(torch.equal(dataset[i]["features"], dataset.features[i])
                   for i in range(len(dataset)))
        assert max(f.shape[-1] for f in dataset.features) > segment


def test_a_training_segment_of_no_length_is_refused(tmp_path) -> None:
    from ser_pipeline.data import SERDataModule
    from ser_pipeline.features import LogMelFeatures

    with pytest.raises(ValueError, match="train_crop_seconds"):
        SERDataModule("synthetic", lambda r: None, str(tmp_path), LogMelFeatures(n_mels=16),
                      [], train_crop_seconds=0.0)
