"""What changes a checkpoint's weights: the reference stream's adapter (``lora``), base-model LoRAs (``base_lora``)
and how the reference stream holds its weights (``reference_weights``)."""
