"""Fine-tuning on streamed feature rows: base models (models), rendering/packing (data), the loop
(trainer), checkpoints (checkpoint) and generation (generate)."""
