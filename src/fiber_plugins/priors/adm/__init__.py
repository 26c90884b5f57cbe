"""ADM (openai/guided-diffusion) UNet checkpoints as diffusers prior folders.

:func:`convert_adm` reads a guided-diffusion ``UNetModel`` state dict (``256x256_diffusion_uncond.pt``,
the LSUN and DPS FFHQ models, ...) and writes an ordinary diffusers folder: ``unet/`` (a
``UNet2DModel``: ``config.json`` + ``diffusion_pytorch_model.safetensors``), ``scheduler/`` (a
``DDPMScheduler`` with the checkpoint's betas) and ``adm_conversion.json`` (what was converted, with
which flags). :func:`fiber_plugins.load_prior` reads the folder like any other pixel prior.

The architecture is given by a preset (:data:`PRESETS`) or by guided-diffusion's own flags
(``num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8", ...``, the names of
``guided_diffusion.script_util.model_and_diffusion_defaults``; unset flags take those defaults).
Every key and shape of the checkpoint is checked against the architecture before anything is
written; a mismatch is one line that names the first mismatching key with both shapes and the
presets whose layout matches the file.

What maps exactly (weights are rearranged, never approximated):

- ResBlocks, with or without ``use_scale_shift_norm`` (FiLM on the second GroupNorm) and with
  ``resblock_updown`` (down/upsampling residual blocks: diffusers' ``ResnetDownsampleBlock2D`` /
  ``ResnetUpsampleBlock2D`` and ``downsample_type="resnet"``) or strided-conv / nearest+conv
  resampling;
- attention blocks: the 1x1 ``qkv`` convolution is split into ``to_q`` / ``to_k`` / ``to_v``
  linear layers, in the legacy head order (heads before q/k/v) or ``use_new_attention_order``
  (q/k/v before heads); ``proj_out`` becomes ``to_out.0``; the softmax scale 1/sqrt(head width)
  is the same; attention follows the res block of each layer, as in ADM;
- the sinusoidal timestep embedding ([cos, sin], ``flip_sin_to_cos=True, freq_shift=0``), the
  class embedding (``label_emb`` -> ``class_embedding``), learned sigma (``2 * in_channels``
  output channels; :class:`~fiber_plugins.priors.DiffusionPrior` keeps the first half, epsilon),
  the linear and cosine beta schedules (``beta_schedule="linear"`` with ADM's 1000/steps scaling,
  ``"squaredcos_cap_v2"``).

What ``UNet2DModel`` cannot express, and is refused with the reason (never converted to a
different network):

- a fixed number of heads (``num_heads`` without ``num_head_channels``) at attention levels of
  different widths, e.g. ``128x128_diffusion.pt`` (4 heads of 128, 192 and 256 channels):
  ``UNet2DModel`` has one head width (``attention_head_dim``) for every block;
- ``channel_mult`` not starting with 1, e.g. ``512x512_diffusion.pt`` (0.5): ADM embeds the timestep
  with ``num_channels`` sinusoids, ``UNet2DModel`` with as many as the first block has channels;
- ``rescale_timesteps`` with ``diffusion_steps != 1000`` (the network took t*1000/steps).

Other ADM networks (the super-resolution models ``64_256_upsampler.pt``, ..., which also take a
low-resolution image; the classifiers; 1D/3D variants) have other keys or shapes, and the key and
shape check refuses them.

Class-conditional checkpoints (ADM's ``label_emb``; they have no null class, so no unconditional
mode) are written with ``num_class_embeds`` (call the UNet with ``class_labels=``), or, with
``class_label=N``, for that one class: the class embedding row N is added to the bias of the time
embedding's last layer, which is exactly ADM's ``emb = time_embed(t) + label_emb(N)``, and the
folder is an unconditional prior of class N.

Weights are read with the package's one safe reader (:func:`fiber_plugins.weights.read_state_dict`:
safetensors, or ``torch.load(weights_only=True)``) and written in float32.
"""

from .architecture import (
    ARCHITECTURE_FLAGS,
    IGNORED_FLAGS,
    NOISE_SCHEDULES,
    PRESETS,
    SUPPORTED_PRESETS,
    ADMArchitecture,
    Preset,
    expressibility_problem,
    resolve_architecture,
)
from .convert import (
    check_state,
    convert_adm,
    convert_state_dict,
    matching_presets,
)
from .layout import adm_shapes, plan, scheduler_config, unet_config

__all__ = [
    "convert_adm",
    "ARCHITECTURE_FLAGS",
    "IGNORED_FLAGS",
    "NOISE_SCHEDULES",
    "Preset",
    "expressibility_problem",
    "plan",
    "PRESETS",
    "SUPPORTED_PRESETS",
    "ADMArchitecture",
    "resolve_architecture",
    "check_state",
    "convert_state_dict",
    "matching_presets",
    "unet_config",
    "scheduler_config",
    "adm_shapes",
]
