"""The prior learns from cached encodings alone: held-out embeddings follow the captions.

Run on a 256-image sample set (224 training, 32 held out): with the default 64 images the tiny
prior memorises its 56 training captions and does not generalise. The control run trains on the
same cache with captions shuffled across images: same data, same steps, no caption signal. So the
test is a controlled experiment: only the caption-image pairing differs between the two runs.

What it does not assert: beating the mean-embedding baseline (`val/cos_mean_true`, ~0.83 here).
The tiny random CLIP's image embeddings share a large common component, so the mean of the other
held-out embeddings is already close to each one; the held-out set is a random subset chosen by
hashes of the input ids (stable under `precompute --update`), whose caption combinations the tiny
prior has partly never seen. Measured on the demo cache, 300 steps at seeds 0, 1, 2: learned
0.781, 0.789, 0.811 vs baseline 0.830 (control 0.700, 0.721, 0.671); only longer, slower runs clear
it, and not at every seed (600 steps at lr 3e-4: 0.825, 0.861). The margins below hold at every seed.
"""

from __future__ import annotations

import pytest

FLAGS = ("--max_train_steps", "300", "--train_batch_size", "32", "--learning_rate", "1e-3", "--use_ema",
         "--validation_steps", "300", "--validation_samples", "32", "--shuffle_buffer", "256")
MARGIN = 0.05  # cosine points; measured gaps (seeds 0-2): learned vs control 0.07-0.14, vs unrelated 0.11-0.13


@pytest.mark.slow
def test_held_out_embeddings_follow_the_captions_and_a_shuffled_control_does_not(train_prior, learning_caches,
                                                                                 tmp_path):
    cache, control = learning_caches
    learned = train_prior(tmp_path / "learned", cache, *FLAGS)["validation"]
    shuffled = train_prior(tmp_path / "control", control, *FLAGS)["validation"]
    print(f"learned {learned}\ncontrol {shuffled}")

    assert learned["val/cos_mean_true"] == shuffled["val/cos_mean_true"]  # same held-out data
    assert learned["val/cos_pred_true"] > shuffled["val/cos_pred_true"] + MARGIN  # the captions carry the signal
    assert learned["val/cos_pred_true"] > learned["val/cos_pred_unrelated"] + MARGIN  # it is this caption's image
    assert shuffled["val/cos_pred_true"] < shuffled["val/cos_mean_true"]  # without captions: not even the mean
