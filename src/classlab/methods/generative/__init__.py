"""The generative family: a small class-conditional diffusion model and what it is used for.

- ``ddpm`` (Ho, Jain and Abbeel, NeurIPS 2020; classifier-free guidance of Ho and Salimans, 2021): a
  denoising diffusion model on the 28x28 coloured-garment pairs, conditioned on a *composition* of
  words ("red" + "trouser"), so that a colour-garment pair held out of training still has a condition.
  It is the family's shared node: the other two methods read its checkpoint.
- ``diffusion_classifier`` (Li, Prabhudesai, Duggal, Brown and Pathak, ICCV 2023; the timestep weighting
  of Jeong, Uselis, Oh and Rohrbach, 2025): classification by each pair's denoising error, evaluation
  only.
- ``classdiffusion`` (Huang et al., ICLR 2025) and its ablation ``personalize`` (``spl_weight: 0``):
  personalisation fine-tuning of the trained DDPM on a few images of one instance, with and without the
  semantic preservation loss.

The model code (the UNet and scheduler come from diffusers) lives in ``ddpm.py``; the protocol functions
that train, sample, classify and personalise are ``classlab.protocols.generative``.
"""
