"""Training with Lightning: the LightningModule, the callbacks that own phase changes, the
pipeline's stages and the continual phases as chained ``Trainer.fit`` calls, the baselines, and
what a run needs around them (the base model, checkpoints, the run lock, progress and console).

Nothing is imported here, so ``import lori.training.run_lock`` does not load Lightning.
"""
