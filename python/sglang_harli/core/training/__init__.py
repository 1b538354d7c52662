"""LoRA training over weights the trainer does not own: the bound base model (``base_model``), the
adapter cut into layer segments (``lora.LoraModel``), a job's planned run in resumable units
(``trainer.LoraTrainer``), activations in lent memory (``memory``), checkpoints (``checkpoint``) and
tensor-parallel slices (``tensor_parallel``)."""
