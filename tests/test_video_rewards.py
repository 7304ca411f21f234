"""Video rewards and video evaluation, independent of any video model.

An image reward applied to videos ``[B, C, F, H, W]`` scores every frame and reduces each video's frame
scores (config ``video_frame_reduction``: mean, or min for "every frame must pass"); evaluation embeds a
video as its pixels or the mean of its frame embeddings, and draws one video a row. Every expectation
here is computed frame by frame in a plain Python loop, not through the library's reshapes.
"""

import pytest
import torch

from orwcfm_fast.config import validate_config
from orwcfm_fast.evaluation import embed_videos, save_samples_figure, video_frames
from orwcfm_fast.rewards import FRAME_REDUCTIONS, CallableReward, Reward, WeightedSum, score_terms

B, C, F, H, W = 3, 3, 5, 4, 6


def _videos(seed=0):
    """Videos whose frames all differ (a frame's mean brightness identifies it)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, F, H, W, generator=g, dtype=torch.float64).float()


def _brightness(images):
    return images.mean(dim=(1, 2, 3))


class _PromptedRed(Reward):
    """Red channel mean plus the prompt's length: shows which prompt each frame got."""

    input_range = (0.0, 1.0)
    takes_prompts = True

    def forward(self, images, prompts):
        assert images.dim() == 4, "an image reward must get frames [N, C, H, W]"
        return images[:, 0].mean(dim=(1, 2)) + torch.tensor([float(len(p)) for p in prompts])


def _per_frame(score, videos, prompts=None):
    """``[B][F]`` scores, one frame at a time."""
    return [[float(score(videos[i, :, j][None], None if prompts is None else [prompts[i]])[0]) for j in range(F)]
            for i in range(B)]


@pytest.mark.parametrize("reduction", FRAME_REDUCTIONS)
def test_an_image_reward_scores_every_frame_and_each_video_is_reduced(reduction):
    videos = _videos()
    total, terms = score_terms(CallableReward(_brightness, name="bright"), videos, None, (0.0, 1.0), reduction)
    frames = _per_frame(lambda x, _: _brightness(x), videos)
    reduce = (lambda v: sum(v) / len(v)) if reduction == "mean" else min
    expected = torch.tensor([reduce(row) for row in frames])
    assert total.shape == (B,) and terms == {}
    # float32 means of 72 values each: the reshape only changes the summation order (<= 1 ulp of ~0.5 per sum)
    assert torch.allclose(total, expected, rtol=0, atol=1e-6), (total, expected)
    # the frames differ, so mean and min differ: the reduction is really applied
    assert all(max(row) - min(row) > 1e-2 for row in frames)


def test_each_frame_gets_its_own_videos_prompt_and_range():
    videos = _videos(1) * 2 - 1  # samples in [-1, 1]; the reward takes [0, 1]
    prompts = ["a", "bbbb", "cc"]
    total, _ = score_terms(_PromptedRed(), videos, prompts, (-1.0, 1.0), "min")
    frames = _per_frame(lambda x, p: _PromptedRed()((x + 1) / 2, p), videos, prompts)
    expected = torch.tensor([min(row) for row in frames])
    assert torch.allclose(total, expected, rtol=0, atol=1e-6), (total, expected)
    red = total - torch.tensor([1.0, 4.0, 2.0])  # video i's frames all got prompt i (lengths 1, 4, 2)
    assert ((red >= 0) & (red <= 1)).all(), total


def test_a_weighted_sum_reduces_each_term_then_weighs():
    videos = _videos(2)
    red = CallableReward(lambda x: x[:, 0].mean(dim=(1, 2)), name="red")
    blue = CallableReward(lambda x: x[:, 2].mean(dim=(1, 2)), name="blue")
    total, terms = score_terms(WeightedSum([(1.0, red), (-2.0, blue)]), videos, None, None, "min")
    red_min = torch.tensor([min(row) for row in _per_frame(lambda x, _: x[:, 0].mean(dim=(1, 2)), videos)])
    blue_min = torch.tensor([min(row) for row in _per_frame(lambda x, _: x[:, 2].mean(dim=(1, 2)), videos)])
    assert torch.allclose(terms["red"], red_min, atol=1e-6) and torch.allclose(terms["blue"], blue_min, atol=1e-6)
    assert torch.allclose(total, red_min - 2 * blue_min, atol=1e-6)


def test_a_video_reward_gets_the_videos_whole():
    class Motion(Reward):
        takes_videos = True

        def forward(self, videos):
            assert videos.shape == (B, C, F, H, W)
            return -(videos[:, :, 1:] - videos[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))

    videos = _videos(3)
    total, _ = score_terms(Motion(), videos, None, None, "mean")
    assert torch.allclose(total, -(videos[:, :, 1:] - videos[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4)))


def test_bad_frame_reductions_are_named():
    reward = CallableReward(_brightness, name="bright")
    with pytest.raises(ValueError, match=r"video_frame_reduction.*'max'"):
        score_terms(reward, _videos(), None, None, "max")
    with pytest.raises(ValueError, match=r"videos \[B, C, F, H, W\].*\(3, 3, 4, 6\)"):
        score_terms(reward, _videos()[:, :, 0], None, None, "mean")
    with pytest.raises(ValueError, match=r"frames of each of 3 videos.*expected \[15\]"):
        score_terms(CallableReward(lambda x: x.mean(dim=(1, 2)), name="wrong"), _videos(), None, None, "mean")
    with pytest.raises(ValueError, match="video_frame_reduction"):
        validate_config({"video_frame_reduction": "max"})


def test_video_embeddings_are_per_video():
    videos = _videos(4)
    pixels = embed_videos(_Pixels(), videos)
    assert torch.equal(pixels, videos.reshape(B, -1).double())

    def frame_embed(images):  # an image model stand-in: per-image channel means
        return images.mean(dim=(2, 3)).double()

    frame_embed.name = "clip"
    per_video = embed_videos(frame_embed, videos)
    expected = torch.stack([torch.stack([videos[i, :, j].mean(dim=(1, 2)) for j in range(F)]).mean(dim=0)
                            for i in range(B)]).double()
    assert per_video.shape == (B, C) and torch.allclose(per_video, expected, atol=1e-7)


class _Pixels:
    name = "pixels"

    def __call__(self, images):
        return images.reshape(images.shape[0], -1).to(torch.float64)


def test_video_grids_show_evenly_spaced_frames_one_video_a_row(tmp_path):
    videos = torch.arange(2 * 1 * 11, dtype=torch.float32).reshape(2, 1, 11, 1, 1).expand(2, 3, 11, 2, 2)
    frames, per_row = video_frames(videos, max_frames=4)
    assert per_row == 4 and frames.shape == (8, 3, 2, 2)
    # frames 0, 3, 7, 10 of video 0, then of video 1 (values are 11 i + j)
    assert frames[:, 0, 0, 0].tolist() == [0, 3, 7, 10, 11, 14, 18, 21]
    short, k = video_frames(videos[:, :, :3], max_frames=8)
    assert k == 3 and short[:, 0, 0, 0].tolist() == [0, 1, 2, 11, 12, 13]
    from PIL import Image

    path = save_samples_figure(torch.rand(3, 3, 9, 8, 8), tmp_path / "grid.png", samples_range=(0.0, 1.0))
    assert Image.open(path).size[0] > Image.open(path).size[1]  # 8 frames across, 3 videos down
