"""Video clips for the input pipeline: temporal sampling, decoding, one augmentation per clip.

input_pipeline.py reads, shards, shuffles, batches and pads; when
config.input.num_frames > 0 its entry points (get_dataset_info,
create_train_iterator, create_eval_iterator) use the functions here in place
of the image ones, so videos keep every guarantee of the image pipeline: a
per-process share, exact resume at any step, stateless per-example
randomness, eval padded with a mask to the same batch count on every process.
Batches keep the key 'image' so the trainer does not branch on the modality:

  train: {'image': (B, T, H, W, 3) float32, 'label': (B, K) float32 soft targets}
  eval:  {'image': (B, T, H, W, 3) float32, 'label': (B,) int32, 'mask': (B,) bool}
         With input.eval_views = V > 1 'image' is (B, V, T, H, W, 3), V clips
         per video: the trainer runs the model on all B * V clips and
         averages each video's V logit vectors before top-1 / top-5.

The video feature (config.image_key, e.g. 'video') is either a
tfds.features.Video, whose frames stay encoded until a clip is chosen (only
its T frames are decoded), or a uint8 tfds.features.Tensor (L, H, W, 3),
which TFDS decodes on reading (the shuffle buffer then holds decoded videos:
keep input.shuffle_buffer small for large ones).

Temporal sampling: a clip is T = num_frames frames, temporal_stride apart,
spanning (T - 1) * temporal_stride + 1 frames of a video of L frames. Train: a
uniformly random start, in every augment mode ('none' included: which stretch
of a video is seen is sampling, like shuffling, not augmentation). Eval: view
v of V starts at max(L - span, 0) * (2v + 1) // (2V), the middle of the v-th
of V equal stretches, so V = 1 is the centred clip. A video shorter than the
span repeats its last frame for the missing ones.

Spatial augmentation is augment.py's, with one crop box, one flip and one
RandAugment / colour-jitter / erasing seed per clip shared by all its frames;
Mixup / CutMix mix whole clips (a CutMix box covers the same pixels of every
frame).

Config fields read here: input.num_frames (T, frames per clip; > 0 selects this
video path), input.temporal_stride and input.eval_views (V); their defaults:
trainer/config_schema.py base_config().
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sparseformer_jax.data import augment
from sparseformer_jax.data import mixup

FEATURE_DESCRIPTION = 'Video or uint8 Tensor (L, H, W, 3)'


def is_video(input_config) -> bool:
  """Whether config.input asks for video clips (num_frames > 0) rather than images."""
  return input_config.num_frames > 0


def is_video_feature(feature) -> bool:
  """Whether a TFDS feature holds uint8 videos: a Video, or a Tensor (L, H, W, 3)."""
  if isinstance(feature, tfds.features.Video):
    return feature.np_dtype == np.uint8
  return (isinstance(feature, tfds.features.Tensor) and feature.np_dtype == np.uint8
          and len(feature.shape) == 4 and feature.shape[-1] == 3)


def clip_span(num_frames: int, stride: int) -> int:
  """Frames from a clip's first to its last frame, both included."""
  return (num_frames - 1) * stride + 1


def clip_indices(starts, length, num_frames: int, stride: int) -> tf.Tensor:
  """starts (...) int32 -> frame indices (..., num_frames); past the end: the last frame."""
  offsets = stride * tf.range(num_frames)
  return tf.minimum(starts[..., None] + offsets, length - 1)


def random_start(seed, length, span: int) -> tf.Tensor:
  """Uniform clip start in [0, max(length - span, 0)] from a (2,) seed."""
  return tf.random.stateless_uniform([], seed, 0, tf.maximum(length - span, 0) + 1,
                                     dtype=tf.int32)


def view_starts(length, span: int, views: int) -> tf.Tensor:
  """(views,) starts of evenly spaced clips; one view is the centred clip."""
  return tf.maximum(length - span, 0) * (2 * tf.range(views) + 1) // (2 * views)


def decode(video) -> tf.Tensor:
  """Encoded frames (L,) tf.string or decoded (L, H, W, 3) uint8 -> (L, H, W, 3) uint8."""
  if video.dtype != tf.string:
    return video
  return tf.map_fn(augment.decode, video,
                   fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))


def _frames(video, indices) -> tf.Tensor:
  """indices (n,) -> those frames (n, H, W, 3) uint8; encoded videos decode only these."""
  return decode(tf.gather(video, indices))


def train_transform(video, seed, input_config) -> tf.Tensor:
  """Video + seed (2,) -> (T, size, size, 3) float32: a random clip, one augmentation."""
  num_frames, stride = input_config.num_frames, input_config.temporal_stride
  time_seed, space_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  length = tf.shape(video)[0]
  start = random_start(time_seed, length, clip_span(num_frames, stride))
  clip = _frames(video, clip_indices(start, length, num_frames, stride))  # (T, H, W, 3)
  return augment.train_transform(clip, space_seed, input_config)


def eval_transform(video, input_config) -> tf.Tensor:
  """Video -> centred clip (T, size, size, 3), or (V, T, size, size, 3) for eval_views V > 1."""
  num_frames, stride = input_config.num_frames, input_config.temporal_stride
  views = input_config.eval_views
  length = tf.shape(video)[0]
  starts = view_starts(length, clip_span(num_frames, stride), views)
  indices = clip_indices(starts, length, num_frames, stride)             # (V, T)
  frames = _frames(video, tf.reshape(indices, [views * num_frames]))     # (V*T, H, W, 3)
  clips = augment.eval_transform(frames, input_config)                   # (V*T, s, s, 3)
  clips = tf.reshape(clips, [views, num_frames, *clips.shape[1:]])
  return clips[0] if views == 1 else clips


def mix_batch(clips, labels, seed, cfg: mixup.MixupConfig):
  """mixup.mix_batch for clips (B, T, H, W, C): one CutMix box for every frame.

  The frames ride along as channels of (B, H, W, T*C) images, so Mixup / CutMix
  see each clip as one image.
  """
  _, frames, height, width, channels = clips.shape
  images = tf.reshape(tf.transpose(clips, [0, 2, 3, 1, 4]),
                      [-1, height, width, frames * channels])
  mixed, targets = mixup.mix_batch(images, labels, seed, cfg)
  mixed = tf.reshape(mixed, [-1, height, width, frames, channels])
  return tf.transpose(mixed, [0, 3, 1, 2, 4]), targets
