"""DreamBooth personalisation of the priors with LoRA (Magic3D §6): a stage of its own.

- ``module``: ``DreamBooth``, the LightningModule (the one training loop of this stage kind).
- ``prior``: the prior it tunes (``PixelPrior``: IF layout; ``LatentPrior``: SD layout, in latent space).
- ``data``: ``PersonalisationSteps``, the stage's data module (paces the steps).
- ``subject``: the subject folder's photos: checked, cropped, resized, composited.
- ``identifier``: the instance prompt ("a sks duck"), its class prompt(s), the rare-identifier check.
- ``class_images``: the frozen prior's class images for prior preservation (cached in the stage).
- ``losses``: DreamBooth's loss with prior preservation.
- ``sampling``: DDIM samples for class images and previews.
- ``card``: the adapter folder's README.

The adapters' file format and their loading by the guidance are in ``magic3d.guidance.lora``.
"""
